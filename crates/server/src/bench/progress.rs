//! A one-line progress bar on standard error, redrawn as requests finish.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Bar {
    inner: Arc<Inner>,
}

struct Inner {
    label: String,
    total: usize,
    done: AtomicUsize,
    failed: AtomicUsize,
    visible: bool,
}

const WIDTH: usize = 30;

impl Bar {
    pub fn new(label: &str, total: usize, visible: bool) -> Self {
        let bar = Bar {
            inner: Arc::new(Inner {
                label: label.to_string(),
                total,
                done: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
                visible,
            }),
        };
        bar.draw();
        bar
    }

    pub fn tick(&self, ok: bool) {
        if !ok {
            self.inner.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.done.fetch_add(1, Ordering::Relaxed);
        self.draw();
    }

    pub fn finish(&self, elapsed: Duration) {
        if self.inner.visible {
            self.draw();
            eprintln!(" {:.1}s", elapsed.as_secs_f64());
        }
    }

    fn draw(&self) {
        let inner = &self.inner;
        if !inner.visible {
            return;
        }
        let done = inner.done.load(Ordering::Relaxed);
        let filled = WIDTH * done / inner.total.max(1);
        let failed = inner.failed.load(Ordering::Relaxed);
        let failed = if failed > 0 { format!(" ({failed} failed)") } else { String::new() };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {done}/{}{failed}",
            inner.label,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            inner.total
        );
        let _ = err.flush();
    }
}
