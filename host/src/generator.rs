//! A loaded generator: the `generator` world's bindings of a model that exports `generate`, and
//! its `generator-info`, asked once at load.

use crate::bindings::generator::GeneratorPre;
use crate::bindings::ModelPre;
use crate::limits::Limits;
use crate::run::call_limited;
use crate::runtime::Runtime;
use crate::store::RunState;

/// A generator's static facts (`generator-info`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GeneratorInfo {
    /// Prompt and generated tokens together.
    pub context_length: u32,
    /// The chat template the model applies (Jinja source).
    pub chat_template: String,
}

/// A loaded generator: its bindings and `generator-info`.
#[derive(Clone)]
pub(crate) struct GeneratorModel {
    pub(crate) pre: GeneratorPre<RunState>,
    pub(crate) info: GeneratorInfo,
}

/// Asks a generator for its `generator-info` (at load), `None` when the component does not
/// export the `generator` world.
pub(crate) async fn fetch_generator(
    runtime: &Runtime,
    model: &ModelPre<RunState>,
    limits: &Limits,
) -> crate::error::Result<Option<GeneratorModel>> {
    let Ok(pre) = GeneratorPre::new(model.instance_pre().clone()) else {
        return Ok(None);
    };
    let call = pre.clone();
    let limited = call_limited(runtime, limits, move |store| {
        Box::pin(async move {
            let instance = call.instantiate_async(&mut *store).await?;
            store
                .data_mut()
                .limit_result_copy(crate::limits::MAX_INFO_BYTES as usize);
            instance.call_generator_info(&mut *store).await
        })
    })
    .await;
    let info = limited.result?;
    Ok(Some(GeneratorModel {
        pre,
        info: GeneratorInfo {
            context_length: info.context_length,
            chat_template: info.chat_template,
        },
    }))
}
