//! The `weft` binary: command-line entry point.

mod admission;
mod bench;
mod chat;
mod completions;
mod config;
mod error;
mod fields;
mod flags;
mod generate;
mod hub;
mod listen;
mod load;
mod media;
mod prepare;
mod progress;
mod prometheus;
mod prompt;
mod responses;
mod responses_input;
mod responses_store;
mod responses_wire;
mod routes;
mod serve;
mod sse;
mod state;
mod structured;
mod tool_calls;
mod wire;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use utoipa::OpenApi;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Serve LLaVA-NeXT-Interleave: images, video and 3D views interleaved with text"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(Box<config::ServeArgs>),
    /// Run one prompt through the model and print the answer as it is generated.
    Generate(generate::GenerateArgs),
    /// Print the OpenAPI specification (YAML).
    Openapi,
    /// Measure any OpenAI-compatible server under load (throughput, TTFT, inter-token latency).
    Bench(bench::BenchArgs),
}

fn main() {
    size_the_compute_pool();
    keep_freed_buffers();
    let matches = Cli::command().get_matches();
    let default_level = if matches.subcommand_name() == Some("serve") { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = Cli::from_arg_matches(&matches).map_err(anyhow::Error::from).and_then(|cli| match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Openapi => {
            print!("{}", routes::ApiDoc::openapi().to_yaml().expect("the spec serializes"));
            Ok(())
        }
        Command::Serve(_) => {
            let sub = matches.subcommand_matches("serve").expect("serve");
            config::ServeArgs::from_matches(sub).and_then(|args| {
                tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::run(args))
            })
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Fixes the compute pool's size before any thread starts: rayon's global pool (Weft's kernels)
/// and candle's ops read the same `RAYON_NUM_THREADS`, so both use one thread per core. Setting
/// it also stops candle 0.11 from re-reading /proc/cpuinfo on every matrix product (5% of a
/// batched decode step here) to count the cores.
fn size_the_compute_pool() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
}

/// Every forward pass allocates and frees activation buffers of megabytes. glibc hands blocks
/// over 128 KiB back to the kernel when freed, so each pass page-faulted its buffers in again
/// (9% of a prefill step here); with these limits they stay in the heap for the next pass.
/// One arena for all threads: the buffers are allocated on the engine's and the compute
/// pool's threads, and glibc's per-thread arenas (heaps of at most 64 MiB, shrunk as they
/// empty) still gave each image request 39,000 fresh pages (160 MB); with one arena a repeated
/// request faults none, and its time to first token drops 2%. Allocations are few and large,
/// so the shared lock costs nothing measurable.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free pages to the system (the server calls it when it goes idle).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
