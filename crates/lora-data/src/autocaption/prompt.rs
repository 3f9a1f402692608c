//! What lorakit asks the vision model: the built-in captioning
//! instructions and the follow-up question that finds a character's own tags.

use super::CaptionStyle;

/// The built-in instruction for SDXL / Illustrious-style tag captions.
pub const TAGS_INSTRUCTION: &str = "Write a caption for this image to train an SDXL / Illustrious image model: \
a comma-separated list of Danbooru-style tags, most important first. \
Use lowercase, spaces instead of underscores, short tags only: no sentences, no numbering, no explanations. \
Cover the subjects (for example 1girl, solo, no humans), pose and action, expression, clothing, objects, \
the setting and background, lighting, composition and camera angle, and the medium or style (photo, anime, 3d). \
Reply with the tags only.";

/// The built-in instruction for natural-language captions.
pub const NATURAL_INSTRUCTION: &str = "Write a caption for this image to train an image model: \
one or two plain sentences that describe the subjects, what they do, the setting and background, \
lighting, composition and the medium or style. No lists, no lead-in, no opinions. Reply with the caption only.";

/// The instruction sent with each image: the user's (from `--prompt-file`)
/// or the built-in one for `style`, plus the words the caption must leave out.
pub fn instruction(
    style: CaptionStyle,
    custom: Option<&str>,
    remove: &[String],
    character: Option<&str>,
) -> String {
    let mut text = match (custom, style) {
        (Some(c), _) => c.trim().to_string(),
        (None, CaptionStyle::Tags) => TAGS_INSTRUCTION.to_string(),
        (None, CaptionStyle::Natural) => NATURAL_INSTRUCTION.to_string(),
    };
    if !remove.is_empty() {
        text.push_str(&format!(" Do not use these words: {}.", remove.join(", ")));
    }
    // Tag captions lose the character's tags by the follow-up question; prose
    // cannot be edited safely afterwards, so the model is told up front.
    if let (Some(c), CaptionStyle::Natural) = (character, style) {
        text.push_str(&format!(
            " The main subject is this character: {c}. Call it \"the character\" and do not describe its fixed appearance."
        ));
    }
    text
}

/// The follow-up question for `--character`: which of one image's tags
/// describe the character itself (what the trigger word should learn).
pub fn character_question(character: &str, tags: &[String]) -> String {
    format!(
        "A LoRA is being trained to teach an image model one character: {character}. \
One training image has these tags: {}. \
Which of these tags describe the character's own fixed appearance (species, body shape, body colours, face, eyes, \
hair, permanent features), the same in every picture of the character? Do not pick tags for the pose, action, \
expression, clothing that can change, other objects, the background, lighting or image style. \
Reply with those tags exactly as written, comma-separated, or with the single word none.",
        tags.join(", ")
    )
}
