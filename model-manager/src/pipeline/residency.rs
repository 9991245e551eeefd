//! Which mapped weights a CPU pipeline keeps in its resident set while each stage of a job
//! runs ([`WeightResidency`]): with [`WeightResidency::Stage`] a stage's entry drops the pages
//! of every component it does not read, so the peak is the largest stage's weights rather
//! than the whole pipeline's.

use crate::controlnet::ControlNetModel;
use crate::mapped::WeightPages;
use crate::weights::WeightResidency;
use std::sync::Arc;

/// A stage of a job, by the weights it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The text encoders.
    Text,
    /// The VAE, encoding an init image or decoding the latents.
    Vae,
    /// The UNet and the job's ControlNets.
    Denoise,
    /// None: between jobs, after loading.
    Idle,
}

/// The pages of a pipeline's components, and its policy.
#[derive(Debug, Clone, Default)]
pub(super) struct StagePages {
    /// When pages are dropped (never, under [`WeightResidency::Resident`]).
    pub policy: WeightResidency,
    /// The text encoders' files.
    pub text: WeightPages,
    /// The UNet's file.
    pub unet: WeightPages,
    /// The VAE's file.
    pub vae: WeightPages,
}

impl StagePages {
    /// Bytes of the components' mapped weights resident in the process now.
    pub fn resident_bytes(&self) -> usize {
        [&self.text, &self.unet, &self.vae]
            .iter()
            .map(|p| p.resident_bytes())
            .sum()
    }

    /// Enters `stage` of a job steered by `nets`: under [`WeightResidency::Stage`] drops the
    /// resident pages of every component `stage` does not read; under
    /// [`WeightResidency::Resident`] does nothing.
    pub fn enter(&self, stage: Stage, nets: &[Arc<ControlNetModel>]) {
        if self.policy != WeightResidency::Stage {
            return;
        }
        let uses = |s: Stage| stage == s;
        let mut released = 0;
        for (pages, reads) in [
            (&self.text, uses(Stage::Text)),
            (&self.vae, uses(Stage::Vae)),
            (&self.unet, uses(Stage::Denoise)),
        ] {
            if reads {
                pages.in_use();
            } else {
                released += pages.release();
            }
        }
        for net in nets {
            if uses(Stage::Denoise) {
                net.pages().in_use();
            } else {
                released += net.pages().release();
            }
        }
        if stage == Stage::Denoise {
            // The freed tensors of the last VAE pass (the largest a job frees) go back too.
            crate::kernels::return_freed_memory();
        }
        tracing::debug!(
            ?stage,
            released_mib = released >> 20,
            "weight pages released"
        );
    }
}
