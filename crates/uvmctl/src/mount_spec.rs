//! `HOST_PATH:GUEST_PATH[:ro]`, the argument of `--disk` and `--share`: parsed, with the host path
//! made absolute here, on the client side (the supervisor that attaches it runs elsewhere).

use std::path::PathBuf;

/// A host path to mount at a guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The image or directory on the host, absolute (not resolved: a symlink stays one).
    pub host_path: PathBuf,
    /// The absolute guest path.
    pub guest_path: String,
    /// `:ro`: attached and mounted read-only.
    pub read_only: bool,
}

impl MountSpec {
    /// The spec again as an argument (`HOST:GUEST[:ro]`), e.g. for the supervisor's command line.
    pub fn to_arg(&self) -> String {
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{}:{}{ro}", self.host_path.display(), self.guest_path)
    }
}

/// A host path made absolute against the current directory, as the user meant it.
pub fn absolute_host_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("the host path is empty".into());
    }
    std::path::absolute(path).map_err(|e| format!("cannot make {path:?} absolute: {e}"))
}

/// Parses `HOST_PATH:GUEST_PATH[:ro]` (also `:rw`). The guest path is the part after the last
/// `:` (before the mode), so a host path may hold colons; the guest path must be absolute.
pub fn parse_mount_spec(arg: &str) -> Result<MountSpec, String> {
    let (rest, read_only) = match arg.rsplit_once(':') {
        Some((rest, "ro")) => (rest, true),
        Some((rest, "rw")) => (rest, false),
        _ => (arg, false),
    };
    let Some((host, guest)) = rest.rsplit_once(':') else {
        return Err(format!("{arg:?} is not HOST_PATH:GUEST_PATH[:ro]"));
    };
    if !guest.starts_with('/') {
        return Err(format!(
            "{arg:?}: the guest path {guest:?} is not absolute (HOST_PATH:GUEST_PATH[:ro])"
        ));
    }
    Ok(MountSpec {
        host_path: absolute_host_path(host)?,
        guest_path: guest.to_owned(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_without_a_guest_path_or_with_a_relative_one_is_refused() {
        for bad in ["data.img", "data.img:", "data.img:data", ":/data", "/a:ro"] {
            assert!(parse_mount_spec(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_mount_spec("img:rel/path").expect_err("relative");
        assert!(e.contains("not absolute"), "{e}");
    }

    #[test]
    fn the_host_path_is_made_absolute_and_the_mode_is_read() {
        let cwd = std::env::current_dir().expect("cwd");
        let spec = parse_mount_spec("data.img:/data:ro").expect("spec");
        assert_eq!(
            spec,
            MountSpec {
                host_path: cwd.join("data.img"),
                guest_path: "/data".into(),
                read_only: true,
            }
        );
        let spec = parse_mount_spec("/srv/www:/www").expect("spec");
        assert_eq!(spec.host_path, PathBuf::from("/srv/www"));
        assert!(!spec.read_only);
        assert!(!parse_mount_spec("/srv:/srv:rw").expect("spec").read_only);
    }

    #[test]
    fn a_host_path_may_hold_colons_and_the_spec_round_trips() {
        let spec = parse_mount_spec("/images/a:b.img:/data").expect("spec");
        assert_eq!(spec.host_path, PathBuf::from("/images/a:b.img"));
        assert_eq!(spec.guest_path, "/data");
        for arg in ["/images/a:b.img:/data", "/x.img:/mnt/x:ro"] {
            let spec = parse_mount_spec(arg).expect("spec");
            assert_eq!(spec.to_arg(), arg);
            assert_eq!(parse_mount_spec(&spec.to_arg()), Ok(spec));
        }
    }
}
