//! Video frames: which frames to sample, and decoding of animated GIFs in-process.

use image::codecs::gif::GifDecoder;
use image::codecs::webp::WebPDecoder;
use image::{AnimationDecoder, DynamicImage, RgbImage};
use std::io::Cursor;
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VideoError {
    #[error("the video has no frames")]
    Empty,
    #[error("cannot decode the video: {0}")]
    Decode(String),
    #[error("unsupported video format (animated GIF, animated WebP, MP4, MOV, WebM and MKV are accepted)")]
    UnknownFormat,
    #[error("FFmpeg is not installed on the server, so MP4, MOV, WebM and MKV videos cannot be read")]
    FfmpegMissing,
    #[error("decoding the video took longer than {0:?}")]
    Timeout(Duration),
    #[error("video frames are {width}x{height}, more than the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
}

/// Container formats, recognised from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Gif,
    WebP,
    /// MP4 and QuickTime (ISO base media: an `ftyp` box first).
    IsoMedia,
    /// WebM and Matroska (EBML).
    Matroska,
}

pub fn container(bytes: &[u8]) -> Option<Container> {
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(Container::Gif)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Container::WebP)
    } else if bytes.len() >= 8 && &bytes[4..8] == b"ftyp" {
        Some(Container::IsoMedia)
    } else if bytes.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        Some(Container::Matroska)
    } else {
        None
    }
}

/// Limits for decoding one video.
#[derive(Debug, Clone)]
pub struct VideoLimits {
    pub max_pixels: u64,
    pub timeout: Duration,
}

/// Decodes a video of any accepted format and samples `n` frames uniformly.
pub async fn sample_video(
    bytes: Vec<u8>,
    n: usize,
    limits: &VideoLimits,
) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    let started = std::time::Instant::now();
    let result = match container(&bytes) {
        Some(Container::Gif) | Some(Container::WebP) => {
            let limits = limits.clone();
            tokio::task::spawn_blocking(move || sample_animation(&bytes, n, limits.max_pixels))
                .await
                .map_err(|e| VideoError::Decode(e.to_string()))?
        }
        Some(Container::IsoMedia) | Some(Container::Matroska) => sample_with_ffmpeg(&bytes, n, limits).await,
        None => Err(VideoError::UnknownFormat),
    };
    metrics::histogram!("weft:media_decode_seconds", "kind" => "video").record(started.elapsed().as_secs_f64());
    result
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

/// Decodes an animated GIF or WebP in-process (frames composited, as a viewer shows them)
/// and keeps `n` of them sampled with [`sample_indices`].
pub fn sample_animation(
    bytes: &[u8],
    n: usize,
    max_pixels: u64,
) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    let decode_err = |e: image::ImageError| VideoError::Decode(e.to_string());
    let (width, height) = match container(bytes) {
        Some(Container::Gif) => image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Gif),
        Some(Container::WebP) => image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::WebP),
        _ => return Err(VideoError::UnknownFormat),
    }
    .into_dimensions()
    .map_err(decode_err)?;
    if width as u64 * height as u64 > max_pixels {
        return Err(VideoError::TooManyPixels { width, height, limit: max_pixels });
    }
    let frames: Vec<image::Frame> = match container(bytes) {
        Some(Container::Gif) => GifDecoder::new(Cursor::new(bytes)).map_err(decode_err)?.into_frames().collect_frames(),
        _ => WebPDecoder::new(Cursor::new(bytes)).map_err(decode_err)?.into_frames().collect_frames(),
    }
    .map_err(decode_err)?;
    if frames.is_empty() {
        return Err(VideoError::Empty);
    }
    let indices = sample_indices(frames.len(), n.min(frames.len()));
    let picked = indices.iter().map(|&i| DynamicImage::ImageRgba8(frames[i].buffer().clone())).collect();
    Ok((indices, picked))
}

/// Kept for callers that only handle GIFs (the CLI).
pub fn sample_gif(bytes: &[u8], n: usize) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    sample_animation(bytes, n, u64::MAX)
}

/// Whether `ffmpeg` and `ffprobe` can be run.
pub fn ffmpeg_available() -> bool {
    ["ffmpeg", "ffprobe"].iter().all(|p| {
        std::process::Command::new(p)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs a program with a deadline; killed if it overruns or if the caller goes away.
async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<Vec<u8>, VideoError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VideoError::FfmpegMissing
            } else {
                VideoError::Decode(e.to_string())
            }
        })?;
    let out =
        tokio::time::timeout(timeout, child.wait_with_output()).await.map_err(|_| VideoError::Timeout(timeout))?;
    let out = out.map_err(|e| VideoError::Decode(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(VideoError::Decode(err.lines().last().unwrap_or("ffmpeg failed").to_string()));
    }
    Ok(out.stdout)
}

/// MP4, MOV, WebM and MKV through the `ffprobe`/`ffmpeg` programs: the bytes go to a private
/// temporary file, the programs may read only local files (no network protocols), one thread
/// each, under the deadline; frames come back as raw RGB.
async fn sample_with_ffmpeg(
    bytes: &[u8],
    n: usize,
    limits: &VideoLimits,
) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    let dir = std::env::temp_dir().join(format!("weft-video-{}-{:x}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).map_err(|e| VideoError::Decode(e.to_string()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let input = dir.join("input");
    std::fs::write(&input, bytes).map_err(|e| VideoError::Decode(e.to_string()))?;
    let input = input.to_string_lossy().into_owned();
    let probe = run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-protocol_whitelist",
            "file",
            "-select_streams",
            "v:0",
            "-count_packets",
            "-show_entries",
            "stream=width,height,nb_read_packets",
            "-of",
            "csv=p=0",
            &input,
        ],
        limits.timeout,
    )
    .await?;
    let probe = String::from_utf8_lossy(&probe);
    let fields: Vec<u64> = probe.trim().split(',').filter_map(|f| f.trim().parse().ok()).collect();
    let [width, height, total] = fields[..] else {
        return Err(VideoError::Decode(format!("no video stream found ({})", probe.trim())));
    };
    if width * height > limits.max_pixels {
        return Err(VideoError::TooManyPixels { width: width as u32, height: height as u32, limit: limits.max_pixels });
    }
    if total == 0 {
        return Err(VideoError::Empty);
    }
    let indices = sample_indices(total as usize, n.min(total as usize));
    let select = indices.iter().map(|i| format!("eq(n\\,{i})")).collect::<Vec<_>>().join("+");
    let filter = format!("select='{select}'");
    let raw = run(
        "ffmpeg",
        &[
            "-nostdin",
            "-v",
            "error",
            "-protocol_whitelist",
            "file",
            "-threads",
            "1",
            "-i",
            &input,
            "-map",
            "0:v:0",
            "-vf",
            &filter,
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
        ],
        limits.timeout,
    )
    .await?;
    let frame_bytes = (width * height * 3) as usize;
    let frames: Vec<DynamicImage> = raw
        .chunks_exact(frame_bytes)
        .map(|c| {
            DynamicImage::ImageRgb8(RgbImage::from_raw(width as u32, height as u32, c.to_vec()).expect("exact chunk"))
        })
        .collect();
    if frames.len() != indices.len() {
        return Err(VideoError::Decode(format!("expected {} frames, decoded {}", indices.len(), frames.len())));
    }
    Ok((indices, frames))
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
