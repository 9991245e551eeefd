//! Random `GenerateRequest`s for fuzzing the request path: each field valid most of the time
//! and, with [`HOSTILE`] percent chance, an edge or garbage value (zero and huge sizes, NaN and
//! infinite floats, unknown enum values, multi-byte and NUL-laden strings at and past the
//! length limits, truncated and random "images"). Used in-process by the worker's unit test and
//! over gRPC by `tests/tests/server_fuzz.rs`.

use jhakaas_proto::v1 as pb;

/// xorshift64*: deterministic, dependency-free randomness for the cases.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.bits() % n.max(1)
    }
    /// One of `xs`.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const SIDES: &[u32] = &[
    0,
    0,
    0,
    1,
    7,
    8,
    9,
    16,
    24,
    32,
    63,
    64,
    65,
    256,
    512,
    520,
    1024,
    4096,
    4160,
    8192,
    8200,
    65536,
    u32::MAX,
];
const STEPS: &[u32] = &[0, 0, 1, 2, 4, 49, 50, 51, 150, 151, 10_000, u32::MAX];
const GUIDANCE: &[f32] = &[
    0.0,
    0.0,
    1.0,
    7.5,
    50.0,
    60.0,
    100.0,
    100.5,
    -1.0,
    f32::NAN,
    f32::INFINITY,
    -0.0,
    f32::MIN_POSITIVE,
];
const STRENGTH: &[f32] = &[0.0, 0.0, 0.5, 1.0, 1.5, -0.1, f32::NAN, 1e-9];
const IMAGES: &[u32] = &[0, 1, 2, 3, 4, 5, 64, u32::MAX];
const SCHEDULERS: &[&str] = &[
    "",
    "",
    "ddim",
    "euler",
    "euler-a",
    "dpmpp-2m",
    "dpmpp-2m-karras",
    "pndm",
    "heun",
    "dpm2-a",
    "dpmpp-2m-sde-karras",
    "unipc",
    "deis",
    "lcm",
    "lms-turbo",
    "DDIM",
    "\u{0}",
];
const RNGS: &[&str] = &[
    "",
    "chacha",
    "torch-cpu",
    "TORCH-CPU",
    "torch-cuda",
    "mt19937",
    "\u{0}",
];
const MODELS: &[&str] = &["", "tiny", "tiny", "nope", "/etc/passwd", "../tiny"];
/// Every field name a refusal may give.
pub const FIELDS: &[&str] = &[
    "request_id",
    "model",
    "prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "num_images",
    "scheduler",
    "rng",
    "output_format",
    "init_image",
    "strength",
    "loras",
    "size_conditioning",
    "latents",
    "mask",
    "outpaint",
    "controlnets",
    "control_image",
    "controlnet",
    "mask_crop_padding",
];

fn text(rng: &mut Rng, max: u64) -> String {
    let len = rng.pick(&[0, 1, 5, 77, 200, max, max + 1]) as usize;
    let alphabet = [
        'a',
        ' ',
        'Z',
        '\u{e9}',
        '\u{4e16}',
        '\u{1f600}',
        '\n',
        '\u{0}',
        '\u{200b}',
    ];
    (0..len)
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
        .collect()
}

fn init_image(rng: &mut Rng, png: &[u8]) -> Vec<u8> {
    match rng.below(40) {
        0 | 1 => png.to_vec(),
        2 => png[..png.len() / 2].to_vec(),
        3 => (0..rng.below(64)).map(|_| rng.bits() as u8).collect(),
        _ => Vec::new(),
    }
}

/// Each field takes a hostile value with this chance (percent), else a valid one, so that both
/// refusals of every kind and acceptances are common.
pub const HOSTILE: u64 = 10;

/// Adapter names a hostile client sends: unknown ones, paths, empty, absurd.
const LORA_NAMES: &[&str] = &[
    "style",
    "",
    "../etc/passwd",
    "/abs",
    ".hidden",
    "a\\b",
    "nul\0",
];

/// A random request; `png` is a small valid init image some requests carry.
pub fn request(rng: &mut Rng, png: &[u8]) -> pb::GenerateRequest {
    macro_rules! field {
        ($valid:expr, $hostile:expr) => {
            if rng.chance(HOSTILE) {
                $hostile
            } else {
                $valid
            }
        };
    }
    let size = |rng: &mut Rng| rng.pick(&[0u32, 0, 0, 0, 1, 64, 1024, 8192, 16385, u32::MAX]);
    let init = init_image(rng, png);
    let with_init = !init.is_empty();
    pb::GenerateRequest {
        request_id: field!(format!("r{}", rng.below(1000)), text(rng, 128)),
        model: field!(rng.pick(&["", "tiny"]).into(), rng.pick(MODELS).into()),
        prompt: field!("a red cube".into(), text(rng, 8192)),
        negative_prompt: field!(String::new(), text(rng, 8192)),
        width: field!(rng.pick(&[0, 0, 8, 64, 128, 256]), rng.pick(SIDES)),
        height: field!(rng.pick(&[0, 0, 8, 64, 128, 256]), rng.pick(SIDES)),
        steps: field!(rng.pick(&[0, 1, 4, 50]), rng.pick(STEPS)),
        guidance_scale: field!(rng.pick(&[0.0, 1.0, 7.5]), rng.pick(GUIDANCE)),
        seed: rng.chance(50).then(|| rng.bits()),
        num_images: field!(rng.pick(&[0, 1, 2]), rng.pick(IMAGES)),
        scheduler: field!(
            rng.pick(&["", "ddim", "euler-a"]).into(),
            rng.pick(SCHEDULERS).into()
        ),
        rng: field!(
            rng.pick(&["", "chacha", "torch-cpu", "torch-cuda"]).into(),
            rng.pick(RNGS).into()
        ),
        output_format: field!(rng.pick(&[0, 1, 2, 3]), rng.pick(&[4, -1, i32::MAX])),
        strength: match (with_init, rng.chance(HOSTILE)) {
            (_, true) => rng.pick(STRENGTH),
            (true, false) => 0.5,
            (false, false) => 0.0,
        },
        init_image: init,
        loras: if rng.chance(HOSTILE) {
            (0..rng.below(10))
                .map(|_| pb::LoraAdapter {
                    name: rng.pick(LORA_NAMES).into(),
                    weight: rng.pick(&[0.0, 1.0, -1.0, 1e9, f32::NAN, f32::INFINITY]),
                })
                .collect()
        } else {
            Vec::new()
        },
        size_conditioning: rng.chance(HOSTILE).then(|| pb::SizeConditioning {
            original_width: size(rng),
            original_height: size(rng),
            crop_top: size(rng),
            crop_left: size(rng),
            target_width: size(rng),
            target_height: size(rng),
        }),
        mask: if rng.chance(HOSTILE) {
            init_image(rng, png)
        } else {
            Vec::new()
        },
        controlnets: if rng.chance(HOSTILE) {
            (0..rng.below(6))
                .map(|_| pb::ControlNetInput {
                    name: rng.pick(&["edges", "", "nope", "../edges"]).into(),
                    image: init_image(rng, png),
                    scale: rng.pick(&[0.0, 1.0, -1.0, 1e9, f32::NAN]),
                    start: rng.pick(&[0.0, 0.5, 1.0, -0.1, f32::NAN]),
                    end: rng.pick(&[0.0, 0.4, 1.0, 2.0]),
                })
                .collect()
        } else {
            Vec::new()
        },
        mask_crop_padding: rng
            .chance(HOSTILE)
            .then(|| rng.pick(&[0, 8, 1000, u32::MAX])),
        outpaint: rng.chance(HOSTILE).then(|| {
            let side = |rng: &mut Rng| rng.pick(&[0u32, 0, 8, 3, 64, 4096, u32::MAX]);
            pb::Outpaint {
                left: side(rng),
                top: side(rng),
                right: side(rng),
                bottom: side(rng),
            }
        }),
    }
}
