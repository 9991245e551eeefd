//! The original Stability (SGM) names of a diffusers UNet's modules — `input_blocks.4.1.proj_in`
//! for `down_blocks.1.attentions.0.proj_in` — which kohya's SDXL LoRAs use. Derived from the
//! base checkpoint's own module names (blocks, resnets, attentions and samplers present), so
//! any `layers_per_block` and block layout maps.

use std::collections::{BTreeMap, BTreeSet};

/// Which parts each block of a UNet has, read from its module names.
#[derive(Debug, Default)]
pub struct Layout {
    /// Per down block: resnet count, whether it has attentions, whether it downsamples.
    down: BTreeMap<usize, (usize, bool, bool)>,
    /// Per up block: resnet count, whether it has attentions, whether it upsamples.
    up: BTreeMap<usize, (usize, bool, bool)>,
}

fn index_after<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl Layout {
    /// Reads the layout from a UNet's module names (`down_blocks.1.resnets.0.conv1`, …).
    pub fn from_modules<'a>(modules: impl Iterator<Item = &'a str>) -> Self {
        let mut layout = Layout::default();
        let mut resnets: BTreeSet<(bool, usize, usize)> = BTreeSet::new();
        for m in modules {
            for (is_down, prefix) in [(true, "down_blocks."), (false, "up_blocks.")] {
                let Some((block, rest)) = index_after(m, prefix) else {
                    continue;
                };
                let entry = if is_down {
                    layout.down.entry(block).or_default()
                } else {
                    layout.up.entry(block).or_default()
                };
                if let Some((r, _)) = index_after(rest, "resnets.") {
                    resnets.insert((is_down, block, r));
                } else if rest.starts_with("attentions.") {
                    entry.1 = true;
                } else if rest.starts_with("downsamplers.") || rest.starts_with("upsamplers.") {
                    entry.2 = true;
                }
            }
        }
        for (is_down, block, r) in resnets {
            let map = if is_down {
                &mut layout.down
            } else {
                &mut layout.up
            };
            let e = map.entry(block).or_default();
            e.0 = e.0.max(r + 1);
        }
        layout
    }

    /// The SGM name of diffusers module `m` (without `.weight`), if it has one.
    pub fn sgm_name(&self, m: &str) -> Option<String> {
        if let Some((block, rest)) = index_after(m, "down_blocks.") {
            let mut slot = 1;
            for (&b, &(n, _, downsamples)) in &self.down {
                if b == block {
                    return match part(rest)? {
                        Part::Resnet(r, tail) => {
                            Some(format!("input_blocks.{}.0.{}", slot + r, resnet(tail)?))
                        }
                        Part::Attention(r, tail) => {
                            Some(format!("input_blocks.{}.1.{tail}", slot + r))
                        }
                        Part::Sampler(tail) => {
                            (tail == "conv").then(|| format!("input_blocks.{}.0.op", slot + n))
                        }
                    };
                }
                slot += n + usize::from(downsamples);
            }
            return None;
        }
        if let Some((block, rest)) = index_after(m, "up_blocks.") {
            let mut slot = 0;
            for (&b, &(n, attends, _)) in &self.up {
                if b == block {
                    return match part(rest)? {
                        Part::Resnet(r, tail) => {
                            Some(format!("output_blocks.{}.0.{}", slot + r, resnet(tail)?))
                        }
                        Part::Attention(r, tail) => {
                            Some(format!("output_blocks.{}.1.{tail}", slot + r))
                        }
                        Part::Sampler(tail) => (tail == "conv").then(|| {
                            format!(
                                "output_blocks.{}.{}.conv",
                                slot + n - 1,
                                1 + usize::from(attends)
                            )
                        }),
                    };
                }
                slot += n;
            }
            return None;
        }
        if let Some(rest) = m.strip_prefix("mid_block.") {
            return match part(rest)? {
                Part::Resnet(r, tail) => Some(format!("middle_block.{}.{}", 2 * r, resnet(tail)?)),
                Part::Attention(0, tail) => Some(format!("middle_block.1.{tail}")),
                _ => None,
            };
        }
        let top = match m {
            "conv_in" => "input_blocks.0.0",
            "time_embedding.linear_1" => "time_embed.0",
            "time_embedding.linear_2" => "time_embed.2",
            "add_embedding.linear_1" => "label_emb.0.0",
            "add_embedding.linear_2" => "label_emb.0.2",
            "conv_out" => "out.2",
            _ => return None,
        };
        Some(top.to_string())
    }
}

enum Part<'a> {
    Resnet(usize, &'a str),
    Attention(usize, &'a str),
    Sampler(&'a str),
}

fn part(rest: &str) -> Option<Part<'_>> {
    if let Some((r, tail)) = index_after(rest, "resnets.") {
        return Some(Part::Resnet(r, tail));
    }
    if let Some((r, tail)) = index_after(rest, "attentions.") {
        return Some(Part::Attention(r, tail));
    }
    let tail = rest
        .strip_prefix("downsamplers.0.")
        .or_else(|| rest.strip_prefix("upsamplers.0."))?;
    Some(Part::Sampler(tail))
}

/// A resnet's layer under its SGM name.
fn resnet(tail: &str) -> Option<&'static str> {
    Some(match tail {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL base 1.0's layout: 3 down blocks of 2 resnets (attention from the second on), 3 up
    /// blocks of 3; the names kohya's SDXL LoRAs use.
    #[test]
    fn sdxl_modules_get_their_sgm_names() {
        let mut names = Vec::new();
        for d in 0..3 {
            for r in 0..2 {
                names.push(format!("down_blocks.{d}.resnets.{r}.conv1"));
                if d > 0 {
                    names.push(format!("down_blocks.{d}.attentions.{r}.proj_in"));
                }
            }
            if d < 2 {
                names.push(format!("down_blocks.{d}.downsamplers.0.conv"));
            }
        }
        for u in 0..3 {
            for r in 0..3 {
                names.push(format!("up_blocks.{u}.resnets.{r}.conv1"));
                if u < 2 {
                    names.push(format!("up_blocks.{u}.attentions.{r}.proj_in"));
                }
            }
            if u < 2 {
                names.push(format!("up_blocks.{u}.upsamplers.0.conv"));
            }
        }
        let l = Layout::from_modules(names.iter().map(String::as_str));
        let sgm = |m: &str| l.sgm_name(m).unwrap();
        assert_eq!(
            sgm("down_blocks.0.resnets.1.conv1"),
            "input_blocks.2.0.in_layers.2"
        );
        assert_eq!(
            sgm("down_blocks.0.downsamplers.0.conv"),
            "input_blocks.3.0.op"
        );
        assert_eq!(
            sgm("down_blocks.1.attentions.0.proj_in"),
            "input_blocks.4.1.proj_in"
        );
        assert_eq!(
            sgm("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"),
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
        );
        assert_eq!(
            sgm("down_blocks.2.resnets.0.conv_shortcut"),
            "input_blocks.7.0.skip_connection"
        );
        assert_eq!(
            sgm("mid_block.resnets.1.time_emb_proj"),
            "middle_block.2.emb_layers.1"
        );
        assert_eq!(
            sgm("mid_block.attentions.0.proj_out"),
            "middle_block.1.proj_out"
        );
        assert_eq!(
            sgm("up_blocks.0.resnets.2.conv2"),
            "output_blocks.2.0.out_layers.3"
        );
        assert_eq!(
            sgm("up_blocks.0.upsamplers.0.conv"),
            "output_blocks.2.2.conv"
        );
        assert_eq!(
            sgm("up_blocks.1.attentions.1.proj_in"),
            "output_blocks.4.1.proj_in"
        );
        assert_eq!(
            sgm("up_blocks.2.resnets.0.conv1"),
            "output_blocks.6.0.in_layers.2"
        );
        assert_eq!(sgm("add_embedding.linear_2"), "label_emb.0.2");
    }
}
