//! `uvmctl cp SRC ID:DST` and `uvmctl cp ID:SRC DST`: one regular file into or out of a running
//! VM over the API's CopyIn / CopyOut streams, its mode kept.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uvm_api::v1;
use uvm_api::v1::copy_in_request::Frame as In;
use uvm_api::v1::copy_out_response::Frame as Out;

use super::{status_error, Target};

/// `uvmctl cp`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  uvmctl cp ./data.bin web:/tmp/data.bin\n  uvmctl cp web:/etc/os-release ./os-release"
)]
pub struct CpArgs {
    /// A local file, or ID:PATH in a VM.
    src: String,
    /// A local path (a directory takes the source's name), or ID:PATH in a VM (the full path
    /// of the file).
    dst: String,
}

const CHUNK: usize = 64 << 10;

/// `ID:PATH` split, when `arg` has that shape (a local path never starts with a VM reference
/// followed by `:/`).
fn vm_path(arg: &str) -> Option<(&str, &str)> {
    arg.split_once(':')
        .filter(|(id, path)| !id.is_empty() && !id.contains('/') && path.starts_with('/'))
}

pub async fn cp(args: CpArgs, root: &Path) -> anyhow::Result<u8> {
    match (vm_path(&args.src), vm_path(&args.dst)) {
        (None, Some((id, path))) => copy_in(root, Path::new(&args.src), id, path).await,
        (Some((id, path)), None) => copy_out(root, id, path, Path::new(&args.dst)).await,
        (Some(_), Some(_)) => {
            bail!("copying from one VM to another is not supported: copy through a local file")
        }
        (None, None) => bail!("one of SRC and DST must be ID:/PATH in a VM"),
    }
}

async fn copy_in(root: &Path, src: &Path, id: &str, path: &str) -> anyhow::Result<u8> {
    let target = Target::find(root, id)?;
    let mut file = tokio::fs::File::open(src)
        .await
        .with_context(|| format!("opening {}", src.display()))?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        bail!("{} is not a regular file", src.display());
    }
    let (tx, rx) = mpsc::channel(8);
    let header = v1::CopyInHeader {
        path: path.to_owned(),
        mode: meta.permissions().mode() & 0o7777,
        size: meta.len(),
    };
    tx.send(v1::CopyInRequest {
        frame: Some(In::Header(header)),
    })
    .await
    .context("queueing the header")?;
    let feeder = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let data = v1::CopyInRequest {
                frame: Some(In::Data(buf[..n].to_vec())),
            };
            if tx.send(data).await.is_err() {
                return Ok(());
            }
        }
    });
    let copied = target
        .client()
        .await?
        .copy_in(target.request(ReceiverStream::new(rx)))
        .await;
    feeder.abort();
    copied.map_err(status_error)?;
    Ok(0)
}

async fn copy_out(root: &Path, id: &str, path: &str, dst: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, id)?;
    let dst: PathBuf = if dst.is_dir() {
        dst.join(
            Path::new(path)
                .file_name()
                .context("the source has no file name")?,
        )
    } else {
        dst.to_path_buf()
    };
    let mut stream = target
        .client()
        .await?
        .copy_out(target.request(v1::CopyOutRequest {
            path: path.to_owned(),
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    let Some(v1::CopyOutResponse {
        frame: Some(Out::Header(header)),
    }) = stream.message().await.map_err(status_error)?
    else {
        bail!("the supervisor sent no header");
    };
    // Written next to the destination, renamed over it once complete.
    let tmp = dst.with_file_name(format!(
        ".{}.uvmcp-{}",
        dst.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut total = 0u64;
        while let Some(message) = stream.message().await.map_err(status_error)? {
            if let Some(Out::Data(data)) = message.frame {
                total += data.len() as u64;
                file.write_all(&data).await?;
            }
        }
        if total != header.size {
            bail!("got {total} bytes of the {} announced", header.size);
        }
        file.sync_all().await?;
        tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(header.mode)).await?;
        tokio::fs::rename(&tmp, &dst)
            .await
            .with_context(|| format!("renaming to {}", dst.display()))?;
        Ok(0)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
