//! The live terminal view: an overall progress bar and a line per finished step. When stdout
//! is not a terminal the bars are hidden and the step lines are printed plainly (CI logs).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Live {
    multi: MultiProgress,
    overall: ProgressBar,
    tty: bool,
}

impl Live {
    pub fn new(steps: u64) -> Live {
        let tty = std::io::stdout().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(steps));
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {wide_msg}",
        ) {
            overall.set_style(style);
        }
        overall.enable_steady_tick(Duration::from_millis(120));
        Live {
            multi,
            overall,
            tty,
        }
    }

    /// What is running now.
    pub fn status(&self, msg: String) {
        self.overall.set_message(msg);
    }

    pub fn step_done(&self) {
        self.overall.inc(1);
    }

    /// A finished result or a note, kept above the bars.
    pub fn line(&self, text: String) {
        if self.tty {
            let _ = self.multi.println(text);
        } else {
            println!("{text}");
        }
    }

    /// A counter bar for a long step (the scale test).
    pub fn counter(&self, len: u64, msg: String) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        if let Ok(style) = ProgressStyle::with_template("  {bar:30.green/white} {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        bar.set_message(msg);
        bar
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}
