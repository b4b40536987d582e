//! Request bodies parsed with bounded memory.
//!
//! A JSON body of `max_body` bytes can describe far more host memory than its size: an array of
//! 500,000 one-letter strings is 2 MB of JSON and about 28 MiB of `String`s (or 32 MiB of
//! `serde_json::Value`s), allocated in small chunks that the allocator keeps after they are
//! freed. Batches are therefore read item by item and refused past [`MAX_BATCH_ITEMS`]
//! without allocating the rest: what is past the cap is only scanned.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

use crate::data::Input;

/// The most items of one batch (`input` of `/v1/embeddings`, `texts` of `/v1/infer`): OpenAI's
/// cap on the items of one embeddings request.
pub const MAX_BATCH_ITEMS: usize = 2048;

/// The `input` of an embeddings request, as far as it was read.
#[derive(Debug, PartialEq)]
pub enum EmbeddingInput {
    /// The texts (one for a plain string), at most [`MAX_BATCH_ITEMS`].
    Texts(Vec<String>),
    /// An array longer than [`MAX_BATCH_ITEMS`]: how many items it had.
    TooMany(usize),
    /// An empty array.
    Empty,
    /// An item that is a number or an array (token ids).
    TokenIds,
    /// Anything else that is not a string or an array of strings.
    NotText,
}

impl<'de> Deserialize<'de> for EmbeddingInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EmbeddingInputVisitor)
    }
}

struct EmbeddingInputVisitor;

impl<'de> Visitor<'de> for EmbeddingInputVisitor {
    type Value = EmbeddingInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an array of strings")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::Texts(vec![text.to_owned()]))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::Texts(vec![text]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        // As the whole array would be judged: too many items first, then token ids anywhere,
        // then any other non-string; texts are kept only while the array can still be valid.
        let mut texts = Vec::new();
        let (mut count, mut token_ids, mut not_text) = (0, false, false);
        loop {
            let item = if count >= MAX_BATCH_ITEMS {
                match items.next_element::<IgnoredAny>()? {
                    Some(_) => Item::Text(None),
                    None => break,
                }
            } else if token_ids || not_text {
                match items.next_element::<Item<false>>()? {
                    Some(item) => item.erase(),
                    None => break,
                }
            } else {
                match items.next_element::<Item<true>>()? {
                    Some(item) => item,
                    None => break,
                }
            };
            count += 1;
            match item {
                Item::Text(Some(text)) => texts.push(text),
                Item::Text(None) => {}
                Item::TokenIds => token_ids = true,
                Item::Other => not_text = true,
            }
        }
        Ok(if count == 0 {
            EmbeddingInput::Empty
        } else if count > MAX_BATCH_ITEMS {
            EmbeddingInput::TooMany(count)
        } else if token_ids {
            EmbeddingInput::TokenIds
        } else if not_text {
            EmbeddingInput::NotText
        } else {
            EmbeddingInput::Texts(texts)
        })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(EmbeddingInput::NotText)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::NotText)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::NotText)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::NotText)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::NotText)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(EmbeddingInput::NotText)
    }
}

/// One item of an embeddings batch; a text is kept only when `KEEP`.
enum Item<const KEEP: bool> {
    Text(Option<String>),
    TokenIds,
    Other,
}

impl<const KEEP: bool> Item<KEEP> {
    fn erase(self) -> Item<true> {
        match self {
            Item::Text(text) => Item::Text(text),
            Item::TokenIds => Item::TokenIds,
            Item::Other => Item::Other,
        }
    }
}

impl<'de, const KEEP: bool> Deserialize<'de> for Item<KEEP> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemVisitor<const KEEP: bool>;
        impl<'de, const KEEP: bool> Visitor<'de> for ItemVisitor<KEEP> {
            type Value = Item<KEEP>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Item::Text(KEEP.then(|| text.to_owned())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Item::Text(KEEP.then_some(text)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::TokenIds)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Item::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Item::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Item::Other)
            }
        }
        d.deserialize_any(ItemVisitor::<KEEP>)
    }
}

/// The `input` of `/v1/infer`: the library's [`Input`], with a batch of texts read item by
/// item and refused past [`MAX_BATCH_ITEMS`] (a parse error naming the cap).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InferInput {
    Text(String),
    Texts(#[serde(deserialize_with = "bounded_texts")] Vec<String>),
    Bytes(Vec<u8>),
    Tensor { shape: Vec<u32>, data: Vec<f32> },
}

impl From<InferInput> for Input {
    fn from(input: InferInput) -> Self {
        match input {
            InferInput::Text(text) => Input::Text(text),
            InferInput::Texts(texts) => Input::Texts(texts),
            InferInput::Bytes(bytes) => Input::Bytes(bytes),
            InferInput::Tensor { shape, data } => Input::Tensor { shape, data },
        }
    }
}

fn bounded_texts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Texts;
    impl<'de> Visitor<'de> for Texts {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an array of at most {MAX_BATCH_ITEMS} strings")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Vec<String>, A::Error> {
            let mut texts = Vec::new();
            while let Some(text) = items.next_element::<String>()? {
                if texts.len() == MAX_BATCH_ITEMS {
                    return Err(de::Error::custom(format_args!(
                        "texts may hold at most {MAX_BATCH_ITEMS} items"
                    )));
                }
                texts.push(text);
            }
            Ok(texts)
        }
    }
    d.deserialize_seq(Texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedding(json: &str) -> EmbeddingInput {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn embedding_inputs_are_read_by_kind() {
        use EmbeddingInput::*;
        assert_eq!(embedding(r#""a""#), Texts(vec!["a".into()]));
        assert_eq!(
            embedding(r#"["a","b"]"#),
            Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(embedding("[]"), Empty);
        assert_eq!(embedding("[1,2]"), TokenIds);
        assert_eq!(embedding("[[1,2]]"), TokenIds);
        assert_eq!(embedding(r#"["a",1]"#), TokenIds);
        assert_eq!(embedding(r#"["a",{"b":1},3]"#), TokenIds);
        assert_eq!(embedding(r#"["a",null]"#), NotText);
        assert_eq!(embedding(r#"["a",null,[2]]"#), TokenIds);
        assert_eq!(embedding("3"), NotText);
        assert_eq!(embedding(r#"{"a":"b"}"#), NotText);
    }

    #[test]
    fn a_batch_past_the_cap_is_counted_not_kept() {
        let at_cap = format!("[{}\"x\"]", "\"x\",".repeat(MAX_BATCH_ITEMS - 1));
        match embedding(&at_cap) {
            EmbeddingInput::Texts(texts) => assert_eq!(texts.len(), MAX_BATCH_ITEMS),
            other => panic!("{other:?}"),
        }
        let over = format!("[{}\"x\"]", "\"x\",".repeat(499_999));
        assert_eq!(embedding(&over), EmbeddingInput::TooMany(500_000));
        // Too many is judged before the kinds of the items, as over the whole array.
        let numbers = format!("[{}1]", "1,".repeat(MAX_BATCH_ITEMS));
        assert_eq!(
            embedding(&numbers),
            EmbeddingInput::TooMany(MAX_BATCH_ITEMS + 1)
        );
        // A malformed item past the cap is still a parse error: the whole body is checked.
        let broken = format!("[{}x]", "\"x\",".repeat(MAX_BATCH_ITEMS + 5));
        assert!(serde_json::from_str::<EmbeddingInput>(&broken).is_err());
    }

    #[test]
    fn infer_texts_past_the_cap_are_a_parse_error() {
        let at_cap = format!(
            "{{\"texts\":[{}\"x\"]}}",
            "\"x\",".repeat(MAX_BATCH_ITEMS - 1)
        );
        let input: Input = serde_json::from_str::<InferInput>(&at_cap).unwrap().into();
        assert_eq!(input, Input::Texts(vec!["x".into(); MAX_BATCH_ITEMS]));
        let over = format!("{{\"texts\":[{}\"x\"]}}", "\"x\",".repeat(MAX_BATCH_ITEMS));
        let error = serde_json::from_str::<InferInput>(&over).err().unwrap();
        assert!(
            error
                .to_string()
                .starts_with("texts may hold at most 2048 items"),
            "{error}"
        );
        // Every other form parses as the library's own.
        for json in [
            r#"{"text":"a"}"#,
            r#"{"bytes":[1,2,255]}"#,
            r#"{"tensor":{"shape":[2],"data":[0.5,-1.0]}}"#,
        ] {
            let ours: Input = serde_json::from_str::<InferInput>(json).unwrap().into();
            assert_eq!(ours, serde_json::from_str::<Input>(json).unwrap(), "{json}");
        }
    }
}
