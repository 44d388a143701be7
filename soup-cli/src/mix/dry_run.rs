//! `soup mix --dry-run`: everything checked, the memory estimate, and a time estimate from a few
//! measured operations; nothing written.

use std::time::Instant;

use soup_core::{ModelStore, Objective, SoupMethod};

use super::args::{check_memory, MixArgs};
use super::evaluation::Evaluation;
use super::soup::Counted;
use crate::common::human_bytes;
use crate::error::Result;
use crate::recipe::Recipe;

/// `--dry-run`: the memory estimate, and a time estimate from one timed model load, one timed
/// gradient step (after a warm-up step) and one timed evaluation batch, scaled by the counts the
/// recipe implies. Rough by design: it ignores what the measured parts do not show (MEHL's
/// projection and θ update, Learned's mixing of N models), stated in its output.
pub(super) fn dry_run(
    args: &MixArgs,
    recipe: &Recipe,
    kind: SoupMethod,
    store: &Counted,
    mut objective: Evaluation,
    estimate: u64,
) -> Result<()> {
    let method = recipe.method();
    let (n, d) = (store.len(), store.inner.arch.layout().numel());
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut params = Vec::new();
    let t_load = timed(&mut || {
        params = store.inner.load(0)?;
        Ok(())
    })?;
    let batch = |index| soup_core::Batch {
        epoch_seed: 0,
        index,
    };
    let batches = objective.num_batches();
    objective.loss_and_grad(&params, batch(0))?;
    let t_step = timed(&mut || {
        objective.loss_and_grad(&params, batch(1.min(batches - 1)))?;
        Ok(())
    })?;
    // One evaluation batch, scaled to the held-out and test splits.
    let (batch_size, eval_bs) = objective.batch_sizes();
    let test_len = objective.test_len();
    let mut one = objective.first_batch()?;
    let first = one.len();
    let t_eval_batch = timed(&mut || {
        one.evaluate(&params)?;
        Ok(())
    })?;
    let heldout_eval = t_eval_batch * objective.len().div_ceil(eval_bs) as f64;
    let test_eval = t_eval_batch * test_len.div_ceil(eval_bs) as f64;
    let (nf, final_eval) = (n as f64, heldout_eval + test_eval);
    let (what, seconds) = match kind {
        SoupMethod::Uniform => (format!("{n} loads + the final evaluation"), nf * t_load),
        SoupMethod::Greedy => (
            format!(
                "{} loads + {} held-out evaluations + the final evaluation",
                2 * n,
                2 * n - 1
            ),
            2.0 * nf * t_load + (2.0 * nf - 1.0) * heldout_eval,
        ),
        SoupMethod::Learned => {
            let steps = recipe.learned_config(&[])?.epochs * batches;
            (
                format!("{n} loads + {steps} steps (each at least one model's step; mixing N models adds to it)"),
                nf * t_load + steps as f64 * t_step,
            )
        }
        SoupMethod::Mehl => {
            let c = recipe.mehl_config(&[])?;
            let model_batches = c.outer_passes * n.div_ceil(c.model_batch.min(n));
            let steps = model_batches * c.inner_epochs * batches;
            (
                format!(
                    "{} loads + {steps} steps (one model's step + 20 % for the directions, as measured at b = 8) + {model_batches} held-out evaluations",
                    c.outer_passes * n
                ),
                (c.outer_passes * n) as f64 * t_load
                    + steps as f64 * t_step * 1.2
                    + model_batches as f64 * heldout_eval,
            )
        }
    };
    let total = seconds + final_eval;
    let what_examples = if objective.is_text() {
        "windows"
    } else {
        "examples"
    };
    println!(
        "dry run of {}: {n} models of {d} parameters; held-out {} {what_examples} ({batches} batches of {batch_size}), test {test_len}",
        method.name(),
        objective.len(),
    );
    println!(
        "  memory   about {} (the method's tensors and the data)",
        human_bytes(estimate)
    );
    if let Err(e) = check_memory(args, method, estimate, n, d) {
        println!("  refused  {}", e.0);
    }
    println!(
        "  measured a model load {:.3} s, a gradient step {:.3} s, an evaluation batch of {} {:.3} s",
        t_load, t_step, first, t_eval_batch
    );
    println!(
        "  time     about {} ({what}; final evaluation {}); rough, on this machine",
        crate::common::clock(total),
        crate::common::clock(final_eval)
    );
    println!("  nothing was written");
    Ok(())
}
