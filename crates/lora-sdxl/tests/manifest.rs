//! Every LoRA target of `SdxlConfig::base()` exists in the SDXL base 1.0
//! checkpoint manifest with the shape the adapter expects, and its kohya name
//! is the one ComfyUI/A1111 look for.

use lora_core::{Component, ModuleKey};
use lora_sdxl::model::keys::weight_location;
use lora_sdxl::{lora_targets, SdxlConfig, TargetScope};
use std::collections::HashMap;

fn manifest() -> HashMap<String, Vec<i64>> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sdxl_base_keys.tsv"
    ))
    .unwrap();
    text.lines()
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            let shape = if s.is_empty() {
                vec![]
            } else {
                s.split(',').map(|d| d.parse().unwrap()).collect()
            };
            (k.to_string(), shape)
        })
        .collect()
}

#[test]
fn targets_exist_in_the_base_checkpoint_with_matching_shapes() {
    let m = manifest();
    assert_eq!(m.len(), 2515);
    let targets = lora_targets(&SdxlConfig::base(), TargetScope::ALL);
    assert_eq!(targets.len(), 1052);
    for t in &targets {
        let loc = weight_location(&t.key).unwrap_or_else(|| panic!("no location for {}", t.key));
        let shape = m
            .get(&loc.key)
            .unwrap_or_else(|| panic!("{} ({}) not in the manifest", loc.key, t.key));
        let mut want = t.weight_shape();
        if loc.fused_part.is_some() {
            want[0] *= 3;
        }
        assert_eq!(shape, &want, "{}", t.key);
        // kohya name parses back to the same key
        let (back, diffusers) = ModuleKey::from_kohya_name(&t.key.kohya_name()).unwrap();
        assert_eq!(back, t.key);
        assert!(!diffusers);
    }
    let names: Vec<String> = targets.iter().map(|t| t.key.kohya_name()).collect();
    for known in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_0_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ] {
        assert!(names.iter().any(|n| n == known), "{known} missing");
    }
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicate kohya names");
    assert_eq!(
        targets
            .iter()
            .filter(|t| t.key.component == Component::Te2)
            .count(),
        192
    );
}

#[test]
fn base_config_implies_exactly_the_manifest() {
    let mut want: Vec<(String, Vec<i64>)> = manifest()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids") && !k.ends_with("logit_scale"))
        .collect();
    want.sort();
    let got = lora_sdxl::model::sdxl::expected_keys(&SdxlConfig::base());
    assert_eq!(got.len(), want.len(), "key count");
    let diff: Vec<_> = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(diff.is_empty(), "first differences (got, want): {diff:?}");
    assert_eq!(got.len(), 2513);
}
