//! Where each key of a LoRA file goes: names are mapped outward from the base checkpoint's
//! own weights (every spelling a weight is known by in kohya, PEFT and older diffusers files),
//! then each adapter module is looked up. Anything that places nowhere, or does not fit the
//! weight it names, is an error naming the keys.

use crate::config::PipelineKind;
use crate::error::{Error, Result};
use crate::source::ModelSource;
use std::collections::{BTreeMap, HashMap};

/// One update placed on a base weight: the adapter keys of its factors.
pub struct Placed {
    pub folder: &'static str,
    pub weight: String,
    pub up: String,
    pub down: String,
    pub alpha: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// Suffixes of the low-rank factors, in every format we read.
const SUFFIXES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// Markers of adapter kinds we do not merge, refused by name.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("hada_w", "LyCORIS LoHa"),
    ("lokr_w", "LyCORIS LoKr"),
    ("dora_scale", "DoRA"),
    (".diff", "full-weight difference (LyCORIS diff)"),
];

#[derive(Debug)]
struct Component {
    folder: &'static str,
    shapes: HashMap<String, Vec<usize>>,
    /// Every name an adapter may use for a weight's module → the weight's name.
    aliases: HashMap<String, String>,
}

/// The weights an adapter may update (the UNet's and each text encoder's), with every name
/// an adapter may give them; read once per model from its weight files' headers.
#[derive(Debug)]
pub struct Targets {
    components: Vec<Component>,
}

impl Targets {
    /// Reads the weight names and shapes of `source`'s UNet and text encoders.
    pub fn of(source: &ModelSource, kind: PipelineKind) -> Result<Self> {
        let mut components = vec![component(
            source,
            "unet",
            "diffusion_pytorch_model",
            &["unet", ""],
            &["lora_unet"],
            false,
        )?];
        for slot in kind.text_encoders() {
            components.push(component(
                source,
                slot.folder,
                "model",
                &[slot.folder],
                slot.kohya_prefixes,
                true,
            )?);
        }
        Ok(Self { components })
    }

    /// Places every update of an adapter file from its tensors' shapes (`file` names it in
    /// errors).
    pub fn place(&self, tensors: &HashMap<String, Vec<usize>>, file: &str) -> Result<Vec<Placed>> {
        let invalid = |reason: String| Error::invalid("lora", format!("{file}: {reason}"));
        if let Some((key, what)) = tensors.keys().find_map(|k| {
            UNSUPPORTED
                .iter()
                .find(|(m, _)| k.contains(m))
                .map(|(_, what)| (k, what))
        }) {
            return Err(invalid(format!(
                "{what} adapters are not supported (key `{key}`); only LoRA (up/down) files are"
            )));
        }
        let mut modules: BTreeMap<String, [Option<&String>; 3]> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in tensors.keys() {
            match split(key) {
                Some((module, role)) => {
                    modules.entry(module).or_default()[role as usize] = Some(key);
                }
                None => unknown.push(key.clone()),
            }
        }
        let mut placed = Vec::new();
        for (module, [down, up, alpha]) in &modules {
            let Some((c, weight)) = self.lookup(module) else {
                unknown.push(module.clone());
                continue;
            };
            let (Some(down), Some(up)) = (down, up) else {
                return Err(invalid(format!("`{module}` lacks its up or down factor")));
            };
            check_fit(&c.shapes[weight], &tensors[*up], &tensors[*down])
                .map_err(|why| invalid(format!("`{module}` does not fit `{weight}`: {why}")))?;
            placed.push(Placed {
                folder: c.folder,
                weight: weight.clone(),
                up: (*up).clone(),
                down: (*down).clone(),
                alpha: alpha.cloned(),
            });
        }
        if !unknown.is_empty() {
            unknown.sort();
            let shown: Vec<String> = unknown.iter().take(3).map(|k| format!("`{k}`")).collect();
            return Err(invalid(format!(
                "{} keys place on no weight of this model (e.g. {}); is the adapter for \
                 another model family?",
                unknown.len(),
                shown.join(", ")
            )));
        }
        if placed.is_empty() {
            return Err(invalid("holds no LoRA weights".into()));
        }
        Ok(placed)
    }

    /// Elements of `folder`'s weight `weight` (0 if it has none of that name).
    pub fn elements(&self, folder: &str, weight: &str) -> u64 {
        self.components
            .iter()
            .filter(|c| c.folder == folder)
            .find_map(|c| c.shapes.get(weight))
            .map_or(0, |s| s.iter().map(|&d| d as u64).product())
    }

    fn lookup(&self, module: &str) -> Option<(&Component, &String)> {
        self.components
            .iter()
            .find_map(|c| c.aliases.get(module).map(|w| (c, w)))
    }
}

/// An adapter key's module and role (`None`: not a LoRA key).
fn split(key: &str) -> Option<(String, Role)> {
    let (suffix, role) = SUFFIXES.iter().find(|(s, _)| key.ends_with(s))?;
    let mut module = key[..key.len() - suffix.len()].to_string();
    if suffix.starts_with("_lora") {
        // Older diffusers attention processors: `….processor.to_q_lora` → `….to_q`.
        module = module.replace(".processor.", ".");
        module = match module.strip_suffix("to_out") {
            Some(head) => format!("{head}to_out.0"),
            None => module,
        };
    }
    Some((module, *role))
}

fn component(
    source: &ModelSource,
    folder: &'static str,
    stem: &str,
    prefixes: &[&str],
    kohya: &[&str],
    text_encoder: bool,
) -> Result<Component> {
    let shapes = crate::weights::tensor_shapes(source, folder, stem)?;
    // kohya's SDXL LoRAs name UNet modules as Stability's original code did.
    let sgm = (!text_encoder).then(|| {
        super::sgm::Layout::from_modules(shapes.keys().filter_map(|n| n.strip_suffix(".weight")))
    });
    let mut aliases = HashMap::new();
    for (name, shape) in &shapes {
        let Some(module) = name.strip_suffix(".weight").filter(|_| shape.len() >= 2) else {
            continue;
        };
        let mut spellings = vec![module.to_string()];
        if text_encoder {
            // transformers 5 drops the `text_model.` prefix that published checkpoints have.
            match module.strip_prefix("text_model.") {
                Some(bare) => spellings.push(bare.to_string()),
                None => spellings.push(format!("text_model.{module}")),
            }
        }
        for m in &spellings {
            for p in prefixes {
                let alias = if p.is_empty() {
                    m.clone()
                } else {
                    format!("{p}.{m}")
                };
                aliases.insert(alias, name.clone());
            }
            for k in kohya {
                aliases.insert(format!("{k}_{}", m.replace('.', "_")), name.clone());
            }
        }
        if let Some(s) = sgm.as_ref().and_then(|l| l.sgm_name(module)) {
            for k in kohya {
                aliases.insert(format!("{k}_{}", s.replace('.', "_")), name.clone());
            }
        }
    }
    Ok(Component {
        folder,
        shapes,
        aliases,
    })
}

/// Checks `up · down` has the weight's shape (a conv LoRA may update a linear weight and the
/// other way round when the element counts agree, as for 1×1 projections).
fn check_fit(weight: &[usize], u: &[usize], d: &[usize]) -> std::result::Result<(), String> {
    if u.len() < 2 || d.len() < 2 || u[1] != d[0] {
        return Err(format!("factors {u:?} and {d:?} do not multiply"));
    }
    let out = weight[0];
    let rest: usize = weight[1..].iter().product();
    let d_rest: usize = d[1..].iter().product();
    let u_rest: usize = u[2..].iter().product();
    if u[0] != out || d_rest != rest || u_rest != 1 {
        return Err(format!(
            "up {u:?} · down {d:?} cannot make the weight's {weight:?}"
        ));
    }
    Ok(())
}
