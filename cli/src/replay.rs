//! `countersign replay [--projection NAME]…`: rebuilds read models from position 0, with a
//! progress bar on stderr. Rebuilding gives exactly what incremental processing gave; run it
//! after changing a projection, or to recover from a damaged read model. Other instances may
//! keep serving meanwhile (the rebuilt tables are written in checkpointed transactions).

use std::io::Write as _;
use std::time::Instant;

use anyhow::bail;
use countersign_projections::ReadModels;

use crate::Settings;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    // The help names every read model from the one list `replay` checks against, so it
    // cannot omit one again (it once left out `transactions`).
    #[arg(
        long = "projection",
        value_name = "NAME",
        help = format!(
            "Rebuild only this read model (repeatable): {}. Default: all.",
            ReadModels::NAMES.join(", ")
        )
    )]
    pub projections: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    for name in &args.projections {
        if !ReadModels::NAMES.contains(&name.as_str()) {
            bail!(
                "unknown projection {name:?}; known: {}",
                ReadModels::NAMES.join(", ")
            );
        }
    }
    let opened = crate::connect(settings).await?;
    let reads = ReadModels::new(opened.database.clone());
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let names = (!args.projections.is_empty()).then_some(args.projections.as_slice());
    let started = Instant::now();
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let events = reads.replay(&opened.events, names, &mut progress).await?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    };
    writeln!(
        std::io::stdout().lock(),
        "replayed {events} events into {} in {seconds:.2} s ({rate:.0} events/s)",
        if args.projections.is_empty() {
            ReadModels::NAMES.join(", ")
        } else {
            args.projections.join(", ")
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use countersign_projections::ReadModels;

    /// `countersign replay --help` names every read model `--projection` accepts.
    #[test]
    fn replay_help_names_every_read_model() {
        let mut cli = crate::Cli::command();
        let replay = cli
            .find_subcommand_mut("replay")
            .expect("a replay subcommand");
        let help = replay.render_long_help().to_string();
        for name in ReadModels::NAMES {
            assert!(help.contains(name), "{name} is missing from:\n{help}");
        }
        assert!(help.contains("transactions"), "{help}");
    }
}
