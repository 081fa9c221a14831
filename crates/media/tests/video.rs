//! Video decoding: in-process animated GIF, and MP4/WebM through FFmpeg (installed by .ci/run),
//! with frames sampled as the official demo does.

use std::path::PathBuf;
use std::time::Duration;
use weft_media::video::{container, sample_video, Container, VideoError, VideoLimits};

fn limits() -> VideoLimits {
    VideoLimits { max_pixels: 1 << 20, max_frames: 1000, timeout: Duration::from_secs(60) }
}

/// A 30-frame test clip (10 fps, 3 s) made by FFmpeg itself.
fn make_clip(ext: &str, codec: &[&str]) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path: PathBuf = std::env::temp_dir().join(format!("weft-clip-{}-{n}.{ext}", std::process::id()));
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=3"])
        .args(codec)
        .arg(&path)
        .status()
        .expect("ffmpeg must be installed for these tests (.ci/run installs it)");
    assert!(status.success());
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

#[tokio::test]
async fn mp4_and_webm_frames_are_sampled_like_the_demo() {
    for (ext, codec) in [("mp4", vec!["-c:v", "mpeg4"]), ("webm", vec!["-c:v", "libvpx", "-b:v", "200k"])] {
        let bytes = make_clip(ext, &codec);
        let kind = container(&bytes).unwrap();
        assert!(matches!(kind, Container::IsoMedia | Container::Matroska), "{ext}");
        let (indices, frames) = sample_video(bytes, 4, &limits()).await.unwrap();
        assert_eq!(indices, vec![0, 9, 19, 29], "{ext}");
        assert_eq!(frames.len(), 4);
        assert_eq!((frames[0].width(), frames[0].height()), (64, 48));
        assert!(frames.windows(2).all(|w| w[0].as_bytes() != w[1].as_bytes()), "{ext}: sampled frames differ");
    }
}

#[tokio::test]
async fn animated_webp_is_decoded_in_process() {
    let bytes = make_clip("webp", &["-c:v", "libwebp_anim", "-loop", "0"]);
    assert_eq!(container(&bytes), Some(Container::WebP));
    let (indices, frames) = sample_video(bytes, 4, &limits()).await.unwrap();
    assert_eq!(indices, vec![0, 9, 19, 29]);
    assert_eq!((frames[3].width(), frames[3].height()), (64, 48));
}

#[tokio::test]
async fn animated_gif_is_decoded_in_process() {
    let gif = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/clip.gif")).unwrap();
    let (indices, frames) = sample_video(gif, 4, &limits()).await.unwrap();
    assert_eq!(indices, vec![0, 3, 6, 9]);
    assert_eq!(frames.len(), 4);
}

#[tokio::test]
async fn oversized_frames_truncated_files_and_unknown_formats_are_refused() {
    let bytes = make_clip("mp4", &["-c:v", "mpeg4"]);
    let small = VideoLimits { max_pixels: 1000, ..limits() };
    assert!(matches!(sample_video(bytes.clone(), 4, &small).await, Err(VideoError::TooManyPixels { .. })));
    let truncated = bytes[..bytes.len() / 3].to_vec();
    assert!(sample_video(truncated, 4, &limits()).await.is_err());
    assert_eq!(sample_video(b"not a video".to_vec(), 4, &limits()).await.unwrap_err(), VideoError::UnknownFormat);
}

/// Animations are counted without decoding and decoded only up to the last sampled frame, one
/// frame at a time; the frames kept are exactly those a full decode would give.
#[tokio::test]
async fn animations_keep_only_the_sampled_frames_and_obey_the_frame_cap() {
    use image::AnimationDecoder;
    let gif = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/clip.gif")).unwrap();
    let all: Vec<image::Frame> = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&gif))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    let (indices, frames) = sample_video(gif.clone(), 3, &limits()).await.unwrap();
    assert_eq!(indices, weft_media::video::sample_indices(all.len(), 3));
    for (i, f) in indices.iter().zip(&frames) {
        assert_eq!(f.to_rgba8().as_raw(), all[*i].buffer().as_raw(), "frame {i}");
    }
    let capped = VideoLimits { max_frames: all.len() - 1, ..limits() };
    assert_eq!(sample_video(gif, 3, &capped).await.unwrap_err(), VideoError::TooManyFrames { limit: all.len() - 1 });
    let webp = make_clip("webp", &["-c:v", "libwebp_anim", "-loop", "0"]);
    let capped = VideoLimits { max_frames: 29, ..limits() };
    assert_eq!(sample_video(webp, 4, &capped).await.unwrap_err(), VideoError::TooManyFrames { limit: 29 });
    let mp4 = make_clip("mp4", &["-c:v", "mpeg4"]);
    assert_eq!(sample_video(mp4, 4, &capped).await.unwrap_err(), VideoError::TooManyFrames { limit: 29 });
}
