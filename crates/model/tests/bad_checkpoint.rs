//! A broken checkpoint directory gives a one-line error naming the file, field or tensor.

use std::path::{Path, PathBuf};
use weft_model::tokenizer::PromptTokenizer;
use weft_model::{LlavaModel, LoadOptions, ModelError};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5")
}

/// A private copy of the fixture to break (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-bad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        Scratch(dir)
    }
    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(path, v.to_string()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_error(dir: &Path) -> String {
    let err = LlavaModel::load(dir, &LoadOptions::default()).err().expect("loading must fail");
    let text = err.to_string();
    assert!(!text.contains('\n'), "error is not one line: {text}");
    text
}

#[test]
fn missing_directory_and_files_are_named() {
    assert!(load_error(Path::new("/nonexistent/weft-model")).contains("/nonexistent/weft-model"));
    let s = Scratch::new("nofile");
    std::fs::remove_file(s.0.join("config.json")).unwrap();
    assert!(load_error(&s.0).contains("config.json"));
    let s = Scratch::new("noweights");
    std::fs::remove_file(s.0.join("model.safetensors")).unwrap();
    assert!(load_error(&s.0).contains("model.safetensors: not found"));
    let s = Scratch::new("notok");
    std::fs::remove_file(s.0.join("tokenizer.json")).unwrap();
    let err = PromptTokenizer::from_dir(&s.0, 545, 729).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn wrong_config_names_the_field() {
    let s = Scratch::new("cfg");
    s.edit_config(|v| v["vision_feature_select_strategy"] = "cls".into());
    assert!(load_error(&s.0).contains("`vision_feature_select_strategy`"));
    s.edit_config(|v| v["vision_feature_select_strategy"] = "full".into());
    s.edit_config(|v| v["text_config"]["num_hidden_layers"] = serde_json::json!(-3));
    assert!(load_error(&s.0).contains("`text_config.num_hidden_layers`"));
    std::fs::write(s.0.join("config.json"), "{ not json").unwrap();
    assert!(load_error(&s.0).contains("config.json"));
}

#[test]
fn truncated_weights_name_the_file() {
    let s = Scratch::new("trunc");
    let path = s.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&s.0);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn misshapen_and_missing_tensors_are_named() {
    let s = Scratch::new("shape");
    s.edit_config(|v| v["vision_config"]["intermediate_size"] = serde_json::json!(80));
    let err = LlavaModel::load(&s.0, &LoadOptions::default()).err().unwrap();
    match &err {
        ModelError::TensorShape { name, expected, found, .. } => {
            assert_eq!(name, "model.vision_tower.encoder.layers.0.mlp.fc1.weight");
            assert_eq!((expected.as_slice(), found.as_slice()), (&[80, 32][..], &[72, 32][..]));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("[80, 32]") && err.to_string().contains("[72, 32]"));

    let s = Scratch::new("missing");
    let path = s.0.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.language_model.layers.1.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    assert!(load_error(&s.0).contains("`model.language_model.layers.1.mlp.up_proj.weight` not found"));
}
