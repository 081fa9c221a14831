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
    #[error("the video has more than {limit} frames")]
    TooManyFrames { limit: usize },
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
    /// Frames the video may have in all (they are read, if not kept, up to the last sampled).
    pub max_frames: usize,
    pub timeout: Duration,
}

/// Width or height a video frame may have at most (FFmpeg's own limit is 16384 too).
const MAX_SIDE: u64 = 16_384;

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
            tokio::task::spawn_blocking(move || sample_animation(&bytes, n, &limits))
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

/// Frames of an animated GIF or WebP, counted without decoding their pixels.
fn count_frames(bytes: &[u8], limit: usize) -> Result<usize, VideoError> {
    let count = match container(bytes) {
        Some(Container::Gif) => {
            let mut options = gif::DecodeOptions::new();
            options.skip_frame_decoding(true);
            let mut decoder = options.read_info(Cursor::new(bytes)).map_err(|e| VideoError::Decode(e.to_string()))?;
            let mut n = 0;
            while decoder.read_next_frame().map_err(|e| VideoError::Decode(e.to_string()))?.is_some() {
                n += 1;
                if n > limit {
                    break; // no need to read the rest
                }
            }
            n
        }
        Some(Container::WebP) => {
            let decoder =
                image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| VideoError::Decode(e.to_string()))?;
            if decoder.is_animated() {
                decoder.num_frames() as usize
            } else {
                1
            }
        }
        _ => return Err(VideoError::UnknownFormat),
    };
    if count > limit {
        return Err(VideoError::TooManyFrames { limit });
    }
    Ok(count)
}

/// Decodes an animated GIF or WebP in-process and keeps `n` frames sampled with
/// [`sample_indices`] (composited, as a viewer shows them). Frames are counted first without
/// decoding; then only the frames up to the last sampled one are decoded, one at a time, and
/// only the sampled ones are kept, all within the limits' frame cap and deadline.
pub fn sample_animation(
    bytes: &[u8],
    n: usize,
    limits: &VideoLimits,
) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    let deadline = std::time::Instant::now() + limits.timeout;
    let decode_err = |e: image::ImageError| VideoError::Decode(e.to_string());
    let (width, height) = match container(bytes) {
        Some(Container::Gif) => image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Gif),
        Some(Container::WebP) => image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::WebP),
        _ => return Err(VideoError::UnknownFormat),
    }
    .into_dimensions()
    .map_err(decode_err)?;
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(VideoError::TooManyPixels { width, height, limit: limits.max_pixels });
    }
    let total = count_frames(bytes, limits.max_frames)?;
    if total == 0 {
        return Err(VideoError::Empty);
    }
    let indices = sample_indices(total, n.min(total));
    let frames: Box<dyn Iterator<Item = image::ImageResult<image::Frame>>> = match container(bytes) {
        Some(Container::Gif) => Box::new(GifDecoder::new(Cursor::new(bytes)).map_err(decode_err)?.into_frames()),
        _ => Box::new(WebPDecoder::new(Cursor::new(bytes)).map_err(decode_err)?.into_frames()),
    };
    // The indices rise strictly; nothing after the last one needs decoding.
    let last = *indices.last().expect("at least one frame");
    let mut picked = Vec::with_capacity(indices.len());
    for (i, frame) in frames.enumerate().take(last + 1) {
        if std::time::Instant::now() > deadline {
            return Err(VideoError::Timeout(limits.timeout));
        }
        let frame = frame.map_err(decode_err)?;
        if indices.binary_search(&i).is_ok() {
            picked.push(DynamicImage::ImageRgba8(frame.buffer().clone()));
        }
    }
    if picked.len() != indices.len() {
        return Err(VideoError::Decode(format!("expected {} frames, decoded {}", indices.len(), picked.len())));
    }
    Ok((indices, picked))
}

/// Kept for callers that only handle GIFs (the CLI and tests).
pub fn sample_gif(bytes: &[u8], n: usize) -> Result<(Vec<usize>, Vec<DynamicImage>), VideoError> {
    sample_animation(
        bytes,
        n,
        &VideoLimits { max_pixels: u64::MAX, max_frames: usize::MAX, timeout: Duration::from_secs(3600) },
    )
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
    tokio::fs::create_dir_all(&dir).await.map_err(|e| VideoError::Decode(e.to_string()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let input = dir.join("input");
    tokio::fs::write(&input, bytes).await.map_err(|e| VideoError::Decode(e.to_string()))?;
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
    // ffprobe reports what the container claims: check it before sizing anything by it.
    if width == 0 || height == 0 {
        return Err(VideoError::Decode(format!("the video stream claims a size of {width}x{height}")));
    }
    if width > MAX_SIDE || height > MAX_SIDE || width * height > limits.max_pixels {
        let side = |v: u64| v.min(u32::MAX as u64) as u32;
        return Err(VideoError::TooManyPixels { width: side(width), height: side(height), limit: limits.max_pixels });
    }
    if total == 0 {
        return Err(VideoError::Empty);
    }
    if total > limits.max_frames as u64 {
        return Err(VideoError::TooManyFrames { limit: limits.max_frames });
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
