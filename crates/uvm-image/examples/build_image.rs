//! Builds (or reuses) the image for the default spec and prints where it is:
//! `cargo run -p uvm-image --example build_image [--force]`. Set `UVM_AGENT` to use another
//! `/init` than the agent in `target/`.

use std::time::Instant;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message, then each cause: the messages do not repeat their sources.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), uvm_image::ImageError> {
    let force = std::env::args().any(|a| a == "--force");
    let spec = uvm_image::ImageSpec::from_env()?;
    let started = Instant::now();
    let image = if force {
        uvm_image::build_image(&spec)?
    } else {
        uvm_image::ensure_image(&spec)?
    };
    println!("id        {}", image.id);
    println!("kernel    {}", image.kernel.display());
    println!("initramfs {}", image.initramfs.display());
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}
