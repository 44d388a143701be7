//! Model cards: the `README.md` of every model directory soup writes, in the Hugging Face
//! format (YAML front matter, then Markdown), saying what the model is, how it was made and how
//! to load it.

use soup_models::{Architecture, InputSpec};

/// A model card: front matter with `tags` and `base_model` (the model this one was made from,
/// as the Hub's model tree reads it), the `title`, the `body` (Markdown sections the command
/// writes) and a "Use" section for the model's architecture.
pub fn card(
    tags: &[&str],
    title: &str,
    body: &str,
    arch: &dyn Architecture,
    base: Option<&str>,
) -> String {
    let mut tags: Vec<&str> = tags.to_vec();
    tags.insert(0, "soup");
    let library = if ["clip-vit", "dinov2-vit", "llama"].contains(&arch.family()) {
        "library_name: transformers\n"
    } else {
        ""
    };
    let base = base.map_or(String::new(), |b| {
        format!("base_model: {}\n", serde_json::Value::from(hub_name(b)))
    });
    format!(
        "---\n{library}{base}tags:\n{}---\n\n# {title}\n\n{body}\n{}",
        tags.iter().map(|t| format!("- {t}\n")).collect::<String>(),
        usage(arch),
    )
}

/// A model source as the Hub names it: `hf://org/name@rev:file` is `org/name`; anything else
/// (a path, a URL) as given.
fn hub_name(source: &str) -> &str {
    match source.strip_prefix("hf://") {
        Some(rest) => rest.split(['@', ':']).next().unwrap_or(rest),
        None => source,
    }
}

/// How to load a model directory of `arch`, in soup and (for CLIP) in transformers.
fn usage(arch: &dyn Architecture) -> String {
    let layout = arch.layout();
    let (inputs, how) = match arch.input() {
        InputSpec::Images(i) => (
            format!(
                "{} classes); inputs {}×{}×{}",
                arch.num_classes(),
                i.channels,
                i.height,
                i.width
            ),
            "```sh\nsoup eval --model THIS_DIRECTORY --data DATA\n```\n",
        ),
        InputSpec::Tokens(t) => (
            format!(
                "vocabulary {}); sequences of up to {} tokens",
                t.vocab_size, t.max_positions
            ),
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             model = AutoModelForCausalLM.from_pretrained(\"THIS_DIRECTORY\")\n\
             tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIRECTORY\")\n```\n",
        ),
    };
    let mut text = format!(
        "## Use\n\nArchitecture `{}` ({} tensors, {} parameters, {inputs}.\n\n{how}",
        arch.family(),
        layout.len(),
        layout.numel(),
    );
    if arch.family() == "clip-vit" {
        text.push_str(
            "\nIn transformers, the vision tower and projection load as \
             `CLIPVisionModelWithProjection`, the preprocessing as `CLIPImageProcessor` \
             (`CLIPImageProcessorPil` equals soup's `--preprocess clip` up to the centre \
             crop's rounding); the classifier is the head `classification_head.weight`, `.bias` \
             (also in `model.safetensors`, reported as unexpected keys) applied to the \
             L2-normalised `image_embeds`:\n\n\
             ```python\nimport torch\nfrom safetensors.torch import load_file\n\
             from transformers import AutoImageProcessor, CLIPVisionModelWithProjection\n\n\
             model = CLIPVisionModelWithProjection.from_pretrained(\"THIS_DIRECTORY\")\n\
             processor = AutoImageProcessor.from_pretrained(\"THIS_DIRECTORY\")\n\
             weights = load_file(\"THIS_DIRECTORY/model.safetensors\")\n\
             head = torch.nn.Linear(*weights[\"classification_head.weight\"].shape[::-1])\n\
             head.load_state_dict({\"weight\": weights[\"classification_head.weight\"], \
             \"bias\": weights[\"classification_head.bias\"]})\n\
             features = model(**processor(images=images, return_tensors=\"pt\")).image_embeds\n\
             logits = head(features / features.norm(dim=-1, keepdim=True))\n```\n",
        );
    }
    if arch.family() == "dinov2-vit" {
        text.push_str(
            "\nIn transformers the whole classifier loads as `Dinov2ForImageClassification` \
             (the head reads [CLS ‖ mean of the patch tokens]; there is no mask token, which \
             only self-supervised pre-training uses). Give it images of the size above: the \
             position embeddings are stored at that size.\n\n\
             ```python\nfrom transformers import Dinov2ForImageClassification\n\n\
             model = Dinov2ForImageClassification.from_pretrained(\"THIS_DIRECTORY\")\n\
             logits = model(pixel_values).logits\n```\n",
        );
    }
    text
}

/// A Markdown table of `rows` under the header `header`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in rows {
        t.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_model_is_named_as_the_hub_names_it() {
        assert_eq!(
            hub_name("hf://org/name@abc123:model.safetensors"),
            "org/name"
        );
        assert_eq!(hub_name("hf://org/name"), "org/name");
        assert_eq!(hub_name("runs/base"), "runs/base");
        let arch = soup_models::build(
            "mlp",
            &serde_json::json!({"input": [1, 2, 2], "hidden": [3], "num_classes": 3}),
        )
        .unwrap();
        let named = card(&["x"], "t", "b", arch.as_ref(), Some("hf://org/base@main"));
        assert!(
            named.starts_with("---\nbase_model: \"org/base\"\ntags:"),
            "{named}"
        );
        let unnamed = card(&["x"], "t", "b", arch.as_ref(), None);
        assert!(!unnamed.contains("base_model"), "{unnamed}");
    }
}
