//! Video frames: which frames to sample, and decoding of animated GIFs in-process.

use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, DynamicImage};
use std::io::Cursor;

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("the animation has no frames")]
    Empty,
    #[error("cannot decode the animation: {0}")]
    Decode(String),
}

/// Frame indices as the official demo computes them: `numpy.linspace(0, total - 1, n, dtype=int)`,
/// i.e. evenly spaced and truncated toward zero.
pub fn sample_indices(total: usize, n: usize) -> Vec<usize> {
    if total == 0 || n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![0];
    }
    let last = (total - 1) as f64;
    let step = last / (n - 1) as f64;
    // numpy computes start + i * step, and pins the final sample to `stop` exactly.
    (0..n).map(|i| if i == n - 1 { total - 1 } else { (i as f64 * step) as usize }).collect()
}

/// Decodes every frame of an animated GIF (composited, as a viewer shows them) and keeps
/// `n` of them sampled with [`sample_indices`]. Returns the indices and the frames.
pub fn sample_gif(bytes: &[u8], n: usize) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    let decoder = GifDecoder::new(Cursor::new(bytes)).map_err(|e| VideoError::Decode(e.to_string()))?;
    let frames: Vec<_> = decoder.into_frames().collect_frames().map_err(|e| VideoError::Decode(e.to_string()))?;
    if frames.is_empty() {
        return Err(VideoError::Empty);
    }
    let indices = sample_indices(frames.len(), n.min(frames.len()));
    let picked = indices.iter().map(|&i| DynamicImage::ImageRgba8(frames[i].buffer().clone())).collect();
    Ok((indices, picked))
}

#[cfg(test)]
mod tests {
    use super::sample_indices;

    #[test]
    fn matches_numpy_linspace_truncation() {
        assert_eq!(sample_indices(10, 4), vec![0, 3, 6, 9]);
        assert_eq!(sample_indices(100, 16), vec![0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]);
        assert_eq!(sample_indices(5, 1), vec![0]);
        assert_eq!(sample_indices(3, 3), vec![0, 1, 2]);
        assert!(sample_indices(0, 4).is_empty());
    }
}
