//! `soup merge CONFIG --out DIR`: a data-free merge from mergekit's configuration, for any
//! architecture soup reads (language models, CLIP, DINOv2). One tensor of every input is in
//! memory at a time, beside the merged model.

pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use soup_core::{data_free_merge, DataFreeMethod, ModelStore, SeededMasks};
use soup_models::checkpoint::{copy_tokenizer, write_model_dir};
use soup_models::FileStore;

use crate::error::{io, CliError, Result};
use crate::output::Output;
use config::{layer_positions, Dtype, MergeConfig};

#[derive(Args, Debug)]
#[command(after_help = methods_help())]
pub struct MergeArgs {
    /// mergekit's YAML configuration (merge_method, base_model, models, parameters, dtype).
    /// Relative model paths are read from the current directory, as mergekit reads them.
    pub config: PathBuf,
    /// The merged model's directory (model.safetensors, config.json, the base's tokenizer,
    /// README.md and the configuration as mergekit_config.yml).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of DARE's and DELLA's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace --out when it holds a directory soup wrote.
    #[arg(long)]
    pub force: bool,
}

/// The methods `soup merge` runs, one line each, for `--help`.
fn methods_help() -> String {
    let mut text =
        String::from("Methods (merge_method), each holding one tensor of every input at a time:\n");
    for m in DataFreeMethod::ALL {
        text.push_str(&format!("  {:<17} {}\n", m.name(), m.summary()));
    }
    text
}

/// The files `soup merge` writes into OUT.
const OUTPUTS: &[&str] = &[
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "mergekit_config.yml",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A model as mergekit names it: a local path (from the current directory), else a Hub
/// repository `org/name`, else any of soup's sources (`hf://`, a URL).
pub(crate) fn resolve(model: &str, quiet: bool) -> Result<PathBuf> {
    if Path::new(model).exists() {
        return Ok(PathBuf::from(model));
    }
    let looks_like_repo = model.split('/').count() == 2
        && !model.starts_with('.')
        && !model.starts_with('/')
        && !model.contains("://");
    let source = if looks_like_repo {
        format!("hf://{model}")
    } else if model.contains("://") {
        model.to_string()
    } else {
        return Err(CliError::new(format!(
            "model {model}: no such file or directory"
        )));
    };
    Ok(
        soup_models::fetch_str(&source, crate::common::downloads(quiet))
            .map_err(|e| CliError::new(format!("model {model}: {e}")))?
            .path,
    )
}

pub fn merge(args: &MergeArgs, quiet: bool) -> Result<()> {
    let config = MergeConfig::read(&args.config)?;
    let (inputs, base) = checked_inputs(&args.config, &config)?;
    let paths = inputs
        .iter()
        .map(|m| resolve(m, quiet))
        .collect::<Result<Vec<_>>>()?;
    let store = FileStore::open(paths.clone(), candle_core::Device::Cpu)?;
    let params = tensor_params(&args.config, &config, &store)?;
    let mut sources: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    sources.push(&args.config);
    let mut output = Output::check(&args.out, "merge", OUTPUTS, &sources, args.force, false)?;
    output.begin(false)?;
    let plan = Plan {
        config: &config,
        store: &store,
        base,
        params,
        tokenizer_from: base.map_or(&paths[0], |b| &paths[b]),
    };
    let result = write(args, &output.partial, plan, quiet);
    match result {
        Ok(()) => output.finish(),
        Err(e) => {
            output.abandon();
            Err(e)
        }
    }
}

/// The configuration's inputs (mergekit's order) and the base's index among them, once their
/// number suits the method: a model listed twice, too few or too many models, or a missing
/// base_model is an error naming the configuration.
pub(crate) fn checked_inputs(
    path: &Path,
    config: &MergeConfig,
) -> Result<(Vec<String>, Option<usize>)> {
    let method = config.method;
    let (inputs, base) = config.inputs();
    let (least, most) = method.non_base_inputs();
    let others = inputs.len() - usize::from(base.is_some());
    if let Some((_, m)) = inputs
        .iter()
        .enumerate()
        .find(|(i, m)| inputs[..*i].contains(m))
    {
        return Err(CliError::new(format!(
            "{}: model {m} is listed twice (mergekit refuses duplicate inputs too)",
            path.display()
        )));
    }
    if others < least || most.is_some_and(|m| others > m) {
        let plural = |k: usize| if k == 1 { "model" } else { "models" };
        let wanted = match most {
            Some(m) if m == least => format!("exactly {m} {}", plural(m)),
            _ => format!("at least {least} {}", plural(least)),
        };
        return Err(CliError::new(format!(
            "{}: {} takes {wanted} besides the base, not {others}",
            path.display(),
            method.name()
        )));
    }
    if base.is_none() && method.base_rule() == soup_core::BaseRule::Required {
        return Err(CliError::new(format!(
            "{}: {} needs base_model",
            path.display(),
            method.name()
        )));
    }
    Ok((inputs, base))
}

/// Every tensor's parameters, in layout order, resolved and checked before any tensor is read;
/// the inputs' tensors must agree in names and shapes.
pub(crate) fn tensor_params(
    path: &Path,
    config: &MergeConfig,
    store: &dyn ModelStore,
) -> Result<Vec<soup_core::TensorParams>> {
    let layout = store.layout(0)?;
    for i in 1..store.len() {
        layout.check_same(&store.name(i), &store.layout(i)?)?;
    }
    let (_, base) = config.inputs();
    let names: Vec<String> = layout.tensors.iter().map(|t| t.name.clone()).collect();
    let positions = layer_positions(&names);
    let mut params = Vec::with_capacity(names.len());
    for (name, &t) in names.iter().zip(&positions) {
        let p = config
            .tensor_params(name, t)
            .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?;
        soup_core::data_free::check_params(config.method, name, base, &p)
            .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?;
        params.push(p);
    }
    Ok(params)
}

/// A merge checked and ready to run.
struct Plan<'a> {
    config: &'a MergeConfig,
    store: &'a FileStore,
    /// The base's index among the inputs.
    base: Option<usize>,
    /// Every tensor's parameters, in layout order.
    params: Vec<soup_core::TensorParams>,
    /// The tokenizer's directory: the base's (mergekit's `tokenizer_source: base`), else the
    /// first model's.
    tokenizer_from: &'a Path,
}

/// The merged model into `partial` (OUT.partial/).
fn write(args: &MergeArgs, partial: &Path, plan: Plan, quiet: bool) -> Result<()> {
    let Plan {
        config,
        store,
        base,
        params,
        tokenizer_from,
    } = plan;
    let started = std::time::Instant::now();
    let n_tensors = params.len();
    // mergekit reads every tensor in `dtype` before merging: the same rounding here, with the
    // arithmetic itself in f32.
    let rounding = config.dtype.filter(|d| *d != Dtype::F32);
    let rounded = Rounded {
        store,
        dtype: rounding,
    };
    let mut masks = SeededMasks { seed: args.seed };
    let mut tensors = data_free_merge(
        &rounded,
        config.method,
        base,
        &mut |k, _| Ok(params[k].clone()),
        &mut masks,
    )?;
    let out_dtype = config.out_dtype.or(config.dtype);
    if let Some(d) = out_dtype {
        tensors = tensors
            .iter()
            .map(|t| t.to_dtype(d.candle()))
            .collect::<candle_core::Result<_>>()?;
    }
    let (inputs, _) = config.inputs();
    let card = card(config, &inputs, base, store.arch.as_ref());
    let mut meta = BTreeMap::new();
    meta.insert(
        "soup_merge_method".to_string(),
        config.method.name().to_string(),
    );
    write_model_dir(partial, store.arch.as_ref(), &tensors, &meta, &card)?;
    if tokenizer_from.is_dir() {
        copy_tokenizer(tokenizer_from, partial)?;
    }
    let yml = partial.join("mergekit_config.yml");
    let text = std::fs::read(&args.config).map_err(|e| io(&args.config, e))?;
    soup_models::checkpoint::atomic_write(&yml, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| soup_models::ModelError::io(tmp, e))
    })?;
    if !quiet {
        eprintln!(
            "{} of {} models: {n_tensors} tensors in {:.1} s -> {}",
            config.method.name(),
            store.len(),
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
    }
    Ok(())
}

/// The store's tensors rounded to the configuration's `dtype`, as mergekit loads them.
struct Rounded<'a> {
    store: &'a FileStore,
    dtype: Option<Dtype>,
}

impl ModelStore for Rounded<'_> {
    fn len(&self) -> usize {
        self.store.len()
    }
    fn name(&self, i: usize) -> String {
        self.store.name(i)
    }
    fn layout(&self, i: usize) -> soup_core::Result<soup_core::ParamLayout> {
        self.store.layout(i)
    }
    fn load(&self, i: usize) -> soup_core::Result<Vec<candle_core::Tensor>> {
        self.store
            .load(i)?
            .into_iter()
            .map(|t| self.round(t))
            .collect()
    }
    fn load_tensor(&self, i: usize, tensor: usize) -> soup_core::Result<candle_core::Tensor> {
        self.round(self.store.load_tensor(i, tensor)?)
    }
}

impl Rounded<'_> {
    fn round(&self, t: candle_core::Tensor) -> soup_core::Result<candle_core::Tensor> {
        Ok(match self.dtype {
            Some(d) => t.to_dtype(d.candle())?.to_dtype(candle_core::DType::F32)?,
            None => t,
        })
    }
}

/// The model card: what was merged, how, and the configuration (as mergekit's cards give it).
fn card(
    config: &MergeConfig,
    inputs: &[String],
    base: Option<usize>,
    arch: &dyn soup_models::Architecture,
) -> String {
    let mut body = format!(
        "A merge made by `soup merge` with {} ({}), data-free.\n\n",
        config.method.name(),
        config.method.summary()
    );
    if let Some(b) = base {
        body.push_str(&format!("Base model: `{}`.\n\n", inputs[b]));
    }
    body.push_str("Models merged:\n\n");
    for (i, m) in inputs.iter().enumerate() {
        if Some(i) != base {
            body.push_str(&format!("- `{m}`\n"));
        }
    }
    body.push_str("\nThe configuration is `mergekit_config.yml`.\n");
    crate::card::card(
        &["merge", "mergekit"],
        &format!("{} merge", config.method.name()),
        &body,
        arch,
        base.map(|b| inputs[b].as_str()),
    )
}
