//! Progress where people wait (downloads, loading the weights): a bar on a terminal, and a
//! plain log line at each tenth when stderr is a file or a pipe.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Below this, progress is not shown while it happens (configuration files, tiny models).
const WATCHED_BYTES: u64 = 16 << 20;

/// Counts bytes towards a total and shows how far it has got.
#[derive(Clone)]
pub struct Meter {
    label: Arc<str>,
    view: Arc<OnceLock<View>>,
}

enum View {
    Bar(ProgressBar),
    /// Work too small to watch: only the line that says it is done, when not on a terminal.
    Small {
        total: u64,
    },
    Log {
        total: u64,
        done: AtomicU64,
        tenths_shown: AtomicU64,
    },
}

impl Meter {
    /// A meter whose total is told later by [`Meter::start`].
    pub fn new(label: &str) -> Meter {
        Meter { label: label.into(), view: Arc::new(OnceLock::new()) }
    }

    /// Sets the total (the first call wins) and shows the meter at zero.
    pub fn start(&self, total: u64) {
        self.view.get_or_init(|| {
            if total < WATCHED_BYTES {
                View::Small { total }
            } else if std::io::stderr().is_terminal() {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "weft: {msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                )
                .expect("a valid template")
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_message(self.label.to_string());
                View::Bar(bar)
            } else {
                eprintln!("weft: {}: 0% of {}", self.label, HumanBytes(total));
                View::Log { total, done: AtomicU64::new(0), tenths_shown: AtomicU64::new(0) }
            }
        });
    }

    /// Adds `bytes` done.
    pub fn add(&self, bytes: u64) {
        match self.view.get() {
            Some(View::Bar(bar)) => bar.inc(bytes),
            Some(View::Log { total, done, tenths_shown }) => {
                let done = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let tenths = (done * 10).checked_div(*total).unwrap_or(10).min(10);
                // One line per tenth, from whichever caller crosses it first.
                let shown = tenths_shown.fetch_max(tenths, Ordering::Relaxed);
                if tenths > shown && tenths < 10 {
                    eprintln!("weft: {}: {}% of {}", self.label, tenths * 10, HumanBytes(*total));
                }
            }
            Some(View::Small { .. }) | None => {}
        }
    }

    /// Sets the bytes done so far.
    pub fn set(&self, done_bytes: u64) {
        match self.view.get() {
            Some(View::Bar(bar)) => bar.set_position(done_bytes),
            Some(View::Log { done, .. }) => {
                let before = done.load(Ordering::Relaxed);
                self.add(done_bytes.saturating_sub(before));
            }
            Some(View::Small { .. }) | None => {}
        }
    }

    /// Marks the work done.
    pub fn finish(&self) {
        match self.view.get() {
            Some(View::Bar(bar)) => bar.finish(),
            Some(View::Log { total, .. }) => eprintln!("weft: {}: done, {}", self.label, HumanBytes(*total)),
            Some(View::Small { total }) if !std::io::stderr().is_terminal() => {
                eprintln!("weft: {}: done, {}", self.label, HumanBytes(*total))
            }
            Some(View::Small { .. }) | None => {}
        }
    }
}

/// hf-hub's download callbacks, shown on a [`Meter`] named after the file.
#[derive(Clone)]
pub struct DownloadProgress(Meter);

impl DownloadProgress {
    pub fn new(file: &str) -> DownloadProgress {
        DownloadProgress(Meter::new(&format!("downloading {file}")))
    }
}

impl hf_hub::api::tokio::Progress for DownloadProgress {
    async fn init(&mut self, size: usize, _file: &str) {
        self.0.start(size as u64);
    }
    async fn update(&mut self, bytes: usize) {
        self.0.add(bytes as u64);
    }
    async fn finish(&mut self) {
        self.0.finish();
    }
}

/// The model loader's callback, shown on a meter "loading weights".
pub fn loading_meter() -> (Meter, weft_model::LoadProgress) {
    let meter = Meter::new("loading weights");
    let callback = {
        let meter = meter.clone();
        Arc::new(move |read: u64, total: u64| {
            meter.start(total);
            meter.set(read);
        })
    };
    (meter, callback)
}
