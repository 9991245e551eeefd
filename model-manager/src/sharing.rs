//! Layer weights shared between a base pipeline and its LoRA variants. While a pipeline is
//! built, every linear and conv layer registers the tensors it keeps under its path (component
//! folder + layer prefix); a variant built with the base's [`SharedWeights`] as donor takes
//! every layer its adapters leave untouched from the base instead of reading and preparing it
//! again, so a variant holds only the layers it changes.

use candle_core::{Result, Tensor};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The prepared layer tensors of one loaded pipeline, by layer path.
#[derive(Debug, Default)]
pub struct SharedWeights {
    layers: Mutex<HashMap<String, Vec<Tensor>>>,
}

impl SharedWeights {
    fn get(&self, key: &str) -> Option<Vec<Tensor>> {
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

/// The component being built on this thread.
struct Scope {
    component: String,
    donor: Option<Arc<SharedWeights>>,
    /// Tensor names (within the component's file) that adapters change.
    touched: HashSet<String>,
    /// Layers kept so far, and whether each came from the donor.
    record: HashMap<String, (Vec<Tensor>, bool)>,
}

impl Scope {
    fn key(&self, layer: &str) -> String {
        format!("{}/{layer}", self.component)
    }

    /// Whether an adapter changes any tensor of the layer at `prefix`.
    fn touches(&self, prefix: &str) -> bool {
        let dot = format!("{prefix}.");
        self.touched.iter().any(|t| t.starts_with(&dot))
    }

    /// The donor's tensors for `layer` when none of `prefixes` is touched.
    fn reusable(&self, layer: &str, prefixes: &[&str]) -> Option<Vec<Tensor>> {
        let donor = self.donor.as_ref()?;
        if prefixes.iter().any(|p| self.touches(p)) {
            return None;
        }
        donor.get(&self.key(layer))
    }
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Builds a pipeline component (`component`: its folder, e.g. `unet`) with `build`, taking
/// untouched layers from `donor` and registering every layer it keeps into `record`.
/// `touched` names the component's tensors that adapters change. Also returns the bytes of
/// the tensors taken from the donor (not held a second time).
pub fn build_component<R>(
    component: &str,
    donor: Option<Arc<SharedWeights>>,
    touched: impl IntoIterator<Item = String>,
    record: &SharedWeights,
    build: impl FnOnce() -> R,
) -> (R, u64) {
    let scope = Scope {
        component: component.to_string(),
        donor,
        touched: touched.into_iter().collect(),
        record: HashMap::new(),
    };
    /// Clears the scope even if `build` panics.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            SCOPE.with(|s| s.borrow_mut().take());
        }
    }
    let previous = SCOPE.with(|s| s.borrow_mut().replace(scope));
    assert!(
        previous.is_none(),
        "pipeline components are built one at a time"
    );
    let clear = Clear;
    let out = build();
    let scope = SCOPE
        .with(|s| s.borrow_mut().take())
        .expect("scope set above");
    drop(clear);
    let mut shared = 0;
    let mut layers = record.layers.lock().unwrap_or_else(|e| e.into_inner());
    for (key, (tensors, from_donor)) in scope.record {
        if from_donor {
            shared += tensors
                .iter()
                .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                .sum::<u64>();
        }
        layers.insert(key, tensors);
    }
    (out, shared)
}

/// The tensors of the layer at `prefix`: the donor's when it has the layer and no adapter
/// touches it, otherwise `prepare()`'s. Outside a component build, `prepare()` alone.
pub fn layer(prefix: &str, prepare: impl FnOnce() -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let reused = SCOPE.with(|s| s.borrow().as_ref()?.reusable(prefix, &[prefix]));
    keep(prefix, reused, prepare)
}

/// A layer fused from the layers at `parts` (attention's q, k and v as one projection): the
/// donor's fused tensors when it has them and no adapter touches a part, otherwise
/// `fuse()`'s. The parts are no longer kept on their own (the model holds only the fused
/// layer).
pub fn fused(parts: &[&str], fuse: impl FnOnce() -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let name = format!("fused({})", parts.join(","));
    let reused = SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        let scope = s.as_mut()?;
        for p in parts {
            let key = scope.key(p);
            scope.record.remove(&key);
        }
        scope.reusable(&name, parts)
    });
    keep(&name, reused, fuse)
}

fn keep(
    layer: &str,
    reused: Option<Vec<Tensor>>,
    prepare: impl FnOnce() -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let from_donor = reused.is_some();
    let tensors = match reused {
        Some(t) => t,
        None => prepare()?,
    };
    SCOPE.with(|s| {
        if let Some(scope) = s.borrow_mut().as_mut() {
            let key = scope.key(layer);
            scope.record.insert(key, (tensors.clone(), from_donor));
        }
    });
    Ok(tensors)
}

/// How one pipeline load shares: the donor (the base pipeline's layers, for a LoRA variant)
/// and where the pipeline's own layers are registered.
#[derive(Debug)]
pub struct Sharing {
    /// The base pipeline's layers, when loading a variant.
    pub donor: Option<Arc<SharedWeights>>,
    /// The layers of the pipeline being loaded.
    pub record: Arc<SharedWeights>,
}

impl Sharing {
    /// [`build_component`] for `component`, whose tensors `deltas` changes.
    pub fn build<R, D>(
        &self,
        component: &str,
        deltas: Option<&HashMap<String, D>>,
        build: impl FnOnce() -> R,
    ) -> (R, u64) {
        let touched = deltas.into_iter().flat_map(|d| d.keys().cloned());
        build_component(component, self.donor.clone(), touched, &self.record, build)
    }
}
