//! "Did you mean …?" for unknown names: config keys, flags, stage names.

use std::path::Path;

use crate::Error;

/// The candidate nearest to `word` by edit distance (Levenshtein; ties go to the first);
/// `None` when there are no candidates.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates.into_iter().min_by_key(|c| strsim::levenshtein(word, c))
}

/// The error for an unknown key of a JSON file: names the file, the key (a dotted path such as
/// `unet.train.lrr`) and the nearest known key of the same object.
pub fn unknown_key<'a>(file: &Path, key: &str, known: impl IntoIterator<Item = &'a str>) -> Error {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let msg = match nearest(leaf, known) {
        Some(n) => format!("unknown key; the nearest known key is `{n}`"),
        None => "unknown key (this object takes no keys)".to_string(),
    };
    Error::Config { file: file.to_path_buf(), key: key.to_string(), msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_by_edit_distance() {
        let keys = ["seed", "image_size", "supersample", "pool_size"];
        assert_eq!(nearest("sede", keys), Some("seed"));
        assert_eq!(nearest("pool_sise", keys), Some("pool_size"));
        assert_eq!(nearest("imagesize", keys), Some("image_size"));
        assert_eq!(nearest("x", std::iter::empty()), None);
        let e = unknown_key(Path::new("c.json"), "unet.train.lrr", ["lr", "steps"]).to_string();
        assert_eq!(e, "c.json: field `unet.train.lrr`: unknown key; the nearest known key is `lr`");
    }
}
