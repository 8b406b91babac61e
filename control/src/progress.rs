//! Progress bars for hastctl commands that wait for the data path (`wait
//! in-sync` now; `verify` later): one bar per resource with bytes done,
//! rate and ETA, drawn on stderr only when stderr is a terminal. Off a
//! terminal nothing is drawn at all, so scripts and logs stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bars are redrawn at most.
const REDRAW_HZ: u8 = 10;

/// Bars for a set of resources.
pub struct Progress {
    multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
    /// While the amount to copy is not known yet: no percentage.
    waiting: ProgressStyle,
    copying: ProgressStyle,
}

/// What one resource shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copying: `done` of `total` bytes.
    Copying { done: u64, total: u64 },
    /// Not copying yet (waiting for the connection or the pass).
    Waiting,
    /// There: 100%.
    Done,
}

impl Progress {
    /// Bars for `names`, labelled `verb` (`syncing`), drawn only when
    /// stderr is a terminal.
    pub fn new(names: &[String], verb: &str) -> Progress {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(REDRAW_HZ)
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let style = |rest: &str| {
            ProgressStyle::with_template(&format!("{{prefix:>{width}}} {verb} [{{bar:30}}] {rest}"))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        };
        let copying = style(
            "{percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        );
        let waiting = style("  -% {msg}");
        let bars = names
            .iter()
            .map(|n| {
                let b = multi.add(ProgressBar::new(1));
                b.set_style(waiting.clone());
                b.set_prefix(n.clone());
                b.enable_steady_tick(Duration::from_millis(500));
                (n.clone(), b)
            })
            .collect();
        Progress {
            multi,
            bars,
            waiting,
            copying,
        }
    }

    /// Runs `f` (which prints) with the bars cleared, then redraws them.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }

    /// Is anything drawn?
    pub fn visible(&self) -> bool {
        !self.multi.is_hidden()
    }

    /// Updates the bar of `name`.
    pub fn update(&self, name: &str, step: Step, note: &str) {
        let Some((_, b)) = self.bars.iter().find(|(n, _)| n == name) else {
            return;
        };
        match step {
            Step::Copying { done, total } => {
                b.set_style(self.copying.clone());
                if b.length() != Some(total) {
                    b.set_length(total);
                }
                b.set_position(done.min(total));
            }
            Step::Waiting => b.set_style(self.waiting.clone()),
            Step::Done => {
                b.set_style(self.copying.clone());
                let len = b.length().filter(|&l| l > 1).unwrap_or(1);
                b.set_length(len);
                b.set_position(len);
            }
        }
        b.set_message(note.to_owned());
    }

    /// Leaves every bar as it is on the screen (100% where done).
    pub fn finish(&self) {
        for (_, b) in &self.bars {
            b.disable_steady_tick();
            b.tick();
            b.abandon();
        }
    }
}
