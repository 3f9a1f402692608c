//! Aspect-ratio buckets (kohya's rule) and SDXL size/crop conditioning.
//!
//! Buckets for a resolution `R`: every `(w, h)` on a 64-px grid with
//! `w·h ≤ R²`, `min ≤ w, h ≤ max`, as kohya's `make_bucket_resolutions`
//! builds them. An image goes to the bucket of nearest aspect ratio among the
//! buckets it can cover **without upscaling**; only an image smaller than every
//! bucket is upscaled (and flagged). It is resized to cover the bucket and the
//! overflow is cropped (centre, or random). The crop is expressed in
//! original-image pixels, which is what SDXL's `crop_coords_top_left`
//! conditioning gets (kohya sends a letterbox offset, AI Toolkit sends 0,0).

use rand::Rng;

/// Bucket width and height in pixels.
pub type Bucket = (u32, u32);

/// Bucket generation settings for one resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// Nominal resolution `R`: buckets have area ≤ R².
    pub resolution: u32,
    /// Smallest side (kohya `min_bucket_reso`).
    pub min_side: u32,
    /// Largest side (kohya `max_bucket_reso`).
    pub max_side: u32,
    /// Grid step (kohya `bucket_reso_steps`, 64).
    pub step: u32,
}

impl BucketSpec {
    /// lorakit's defaults for a resolution: step 64, min side `min(256, R)`,
    /// max side `max(1024, R)` (kohya's defaults, widened for large R).
    pub fn for_resolution(resolution: u32) -> Self {
        Self {
            resolution,
            min_side: resolution.min(256),
            max_side: resolution.max(1024),
            step: 64,
        }
    }

    /// kohya `model_util.make_bucket_resolutions`, sorted ascending.
    pub fn buckets(&self) -> Vec<Bucket> {
        let d = self.step.max(1);
        let min = self.min_side / d * d;
        let max = self.max_side.div_ceil(d) * d;
        let area = self.resolution as u64 * self.resolution as u64;
        let mut set = std::collections::BTreeSet::new();
        let s = ((area as f64).sqrt() as u32) / d * d;
        set.insert((s, s));
        let mut w = min.max(d);
        while w <= max {
            let h = (((area / w as u64) as u32) / d * d).min(max);
            if h >= min {
                set.insert((w, h));
                set.insert((h, w));
            }
            w += d;
        }
        set.into_iter().collect()
    }
}

/// Where an image goes and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// The bucket (target size).
    pub bucket: Bucket,
    /// Scale from original pixels to bucket pixels (> 1 means upscaled).
    pub scale: f64,
    /// Crop box in original-image pixels: left, top, width, height.
    pub crop: CropBox,
    /// True when the image had to be upscaled (smaller than every bucket).
    pub upscaled: bool,
}

/// A rectangle in original-image pixels (may be fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub left: f64,
    /// Top edge.
    pub top: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// How to position the crop when the image overflows its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropMode {
    /// Cut the overflow equally on both sides.
    Centre,
    /// Uniformly random position.
    Random,
}

fn aspect(b: Bucket) -> f64 {
    b.0 as f64 / b.1 as f64
}

/// Picks the bucket for a `w × h` image (see the module docs).
pub fn select_bucket(buckets: &[Bucket], w: u32, h: u32) -> Option<(Bucket, bool)> {
    if buckets.is_empty() || w == 0 || h == 0 {
        return None;
    }
    let ar = w as f64 / h as f64;
    let nearest = |it: &mut dyn Iterator<Item = &Bucket>| {
        let mut best: Option<(Bucket, f64)> = None;
        for &b in it {
            let err = (aspect(b) - ar).abs();
            if best.is_none_or(|(_, e)| err < e - 1e-12) {
                best = Some((b, err));
            }
        }
        best.map(|(b, _)| b)
    };
    if buckets.contains(&(w, h)) {
        return Some(((w, h), false));
    }
    let fits = |b: &&Bucket| b.0 <= w && b.1 <= h;
    if let Some(b) = nearest(&mut buckets.iter().filter(fits)) {
        return Some((b, false));
    }
    nearest(&mut buckets.iter()).map(|b| (b, true))
}

/// Places a `w × h` image into `bucket`: cover-resize and crop.
/// `crop_pos` in `[0, 1]` positions the crop along the overflowing axis
/// (0.5 = centre).
pub fn place(bucket: Bucket, w: u32, h: u32, crop_pos: f64) -> Placement {
    let (bw, bh) = (bucket.0 as f64, bucket.1 as f64);
    let (w, h) = (w as f64, h as f64);
    let scale = (bw / w).max(bh / h);
    let (cw, ch) = (bw / scale, bh / scale);
    let t = crop_pos.clamp(0.0, 1.0);
    let crop = CropBox {
        left: (w - cw).max(0.0) * t,
        top: (h - ch).max(0.0) * t,
        width: cw.min(w),
        height: ch.min(h),
    };
    Placement {
        bucket,
        scale,
        crop,
        upscaled: scale > 1.0 + 1e-9,
    }
}

/// Chooses a bucket and places the image in it.
pub fn assign<R: Rng + ?Sized>(
    buckets: &[Bucket],
    w: u32,
    h: u32,
    mode: CropMode,
    rng: &mut R,
) -> Option<Placement> {
    let (bucket, _) = select_bucket(buckets, w, h)?;
    let pos = match mode {
        CropMode::Centre => 0.5,
        CropMode::Random => rng.gen::<f64>(),
    };
    Some(place(bucket, w, h, pos))
}

/// SDXL's six conditioning integers for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeConditioning {
    /// Original image (height, width), after EXIF orientation.
    pub original_hw: (u32, u32),
    /// Crop top-left (top, left) in original-image pixels.
    pub crop_top_left: (u32, u32),
    /// Target (height, width) = the bucket.
    pub target_hw: (u32, u32),
}

impl SizeConditioning {
    /// From an image size and its placement; `flipped` mirrors the crop's left edge.
    pub fn new(w: u32, h: u32, p: &Placement, flipped: bool) -> Self {
        let left = if flipped {
            w as f64 - (p.crop.left + p.crop.width)
        } else {
            p.crop.left
        };
        Self {
            original_hw: (h, w),
            crop_top_left: (
                p.crop.top.round().max(0.0) as u32,
                left.round().max(0.0) as u32,
            ),
            target_hw: (p.bucket.1, p.bucket.0),
        }
    }

    /// `[H₀, W₀, top, left, H, W]` as SDXL's `add_time_ids` expects.
    pub fn as_array(&self) -> [u32; 6] {
        [
            self.original_hw.0,
            self.original_hw.1,
            self.crop_top_left.0,
            self.crop_top_left.1,
            self.target_hw.0,
            self.target_hw.1,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_testkit::Tolerance;

    /// Crop arithmetic in f64 (deterministic IEEE arithmetic on every x86-64
    /// CPU): two roundings at the magnitude of the image side (1500 px);
    /// 5.2e-14 measured (the same with 1 thread and AVX2-limited). Margin 16.
    const CROP_F64: Tolerance = Tolerance::new(
        2.0 * f64::EPSILON * 1500.0,
        16.0,
        "f64 rounding at the image side",
    );

    fn kohya(res: u32, min: u32, max: u32) -> Vec<Bucket> {
        BucketSpec {
            resolution: res,
            min_side: min,
            max_side: max,
            step: 64,
        }
        .buckets()
    }

    #[test]
    fn kohya_vectors() {
        let b = kohya(1024, 256, 1024);
        assert_eq!(b.len(), 25);
        assert!(b.iter().all(|&(w, h)| w == 1024 || h == 1024), "{b:?}");
        assert_eq!(b.first(), Some(&(256, 1024)));
        assert!(b.contains(&(1024, 256)));
        assert!(b.contains(&(1024, 1024)));

        let b = kohya(1024, 256, 2048);
        assert_eq!(b.len(), 41);
        let half = [
            (256, 2048),
            (320, 2048),
            (384, 2048),
            (448, 2048),
            (512, 1856),
            (512, 1920),
            (512, 1984),
            (512, 2048),
            (576, 1664),
            (576, 1728),
            (576, 1792),
            (640, 1536),
            (640, 1600),
            (704, 1408),
            (704, 1472),
            (768, 1280),
            (768, 1344),
            (832, 1216),
            (896, 1152),
            (960, 1088),
            (1024, 1024),
        ];
        for (w, h) in half {
            assert!(b.contains(&(w, h)) && b.contains(&(h, w)), "{w}x{h}");
        }
        assert!(b.iter().all(|&(w, h)| w * h <= 1024 * 1024));
    }

    #[test]
    fn assignment_and_crop_examples() {
        let b = kohya(1024, 256, 2048);
        // 1500×1000 → (1216, 832): scale 0.832, resized 1248×832, 16 px cut per side (kohya's example).
        let p = place(select_bucket(&b, 1500, 1000).unwrap().0, 1500, 1000, 0.5);
        assert_eq!(p.bucket, (1216, 832));
        // exact: 832 / 1000 rounded once is the f64 nearest 0.832, as the literal
        assert_eq!(p.scale, 0.832);
        CROP_F64.check(
            "resized crop per side − 16 px",
            (p.crop.left * p.scale - 16.0).abs(),
        );
        assert_eq!(p.crop.top, 0.0);
        let c = SizeConditioning::new(1500, 1000, &p, false);
        assert_eq!(c.as_array(), [1000, 1500, 0, 19, 832, 1216]);
        // flipped: the crop's left edge is mirrored
        let c = SizeConditioning::new(1500, 1000, &p, true);
        assert_eq!(c.crop_top_left, (0, 19));

        // 800×1200 portrait, too small to cover any 1024² bucket → upscaled to (832, 1216)
        let (bucket, up) = select_bucket(&b, 800, 1200).unwrap();
        assert_eq!(bucket, (832, 1216));
        assert!(up);
        let p = place(bucket, 800, 1200, 0.5);
        assert!(p.upscaled);
        let c = SizeConditioning::new(800, 1200, &p, false);
        assert_eq!(c.original_hw, (1200, 800));
        assert_eq!(c.target_hw, (1216, 832));
        assert_eq!(c.crop_top_left.1, 0);
        assert!(c.crop_top_left.0 <= 15, "{c:?}");

        // square in square: no crop
        let p = place(select_bucket(&b, 2048, 2048).unwrap().0, 2048, 2048, 0.5);
        assert_eq!(p.bucket, (1024, 1024));
        assert_eq!(
            SizeConditioning::new(2048, 2048, &p, false).crop_top_left,
            (0, 0)
        );
        // exact bucket size: used as is
        assert_eq!(select_bucket(&b, 832, 1216), Some(((832, 1216), false)));
    }

    #[test]
    fn never_upscales_when_a_bucket_fits() {
        let b = BucketSpec::for_resolution(512).buckets();
        for (w, h) in [
            (3000, 2000),
            (1024, 1024),
            (600, 900),
            (2000, 500),
            (513, 700),
        ] {
            let (bucket, up) = select_bucket(&b, w, h).unwrap();
            if !up {
                assert!(bucket.0 <= w && bucket.1 <= h, "{w}x{h} -> {bucket:?}");
                assert!(place(bucket, w, h, 0.5).scale <= 1.0);
            }
        }
        assert!(
            select_bucket(&b, 300, 300).unwrap().1,
            "300² is smaller than every 512 bucket"
        );
    }

    #[test]
    fn random_crop_stays_inside() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..100 {
            let p = assign(&[(512, 512)], 900, 600, CropMode::Random, &mut rng).unwrap();
            // exact in f64: 900 − width is exact (Sterbenz: width ≥ 450), and
            // rounding is monotonic, so left ≤ 900 − width and left + width ≤ 900
            assert!(p.crop.left >= 0.0 && p.crop.left + p.crop.width <= 900.0);
            assert_eq!(p.crop.top, 0.0);
        }
    }
}
