//! The media parts of a chat request: counted against the per-request limits as the walk over
//! the messages finds them (`prompt.rs`), before anything is fetched, then fetched and decoded
//! concurrently under one deadline and one byte budget charged while reading, answered in the
//! order the client sent them, by at most `media_concurrency` requests at once. Dropping the
//! future (client gone) cancels every fetch and decoder.

use crate::error::{ApiError, ErrorKind};
use crate::state::{Loaded, RequestLimits};
use image::DynamicImage;
use std::time::Instant;
use weft_media::budget::ByteBudget;
use weft_media::fetch::{fetch, FetchError};
use weft_media::video::{sample_video, VideoError, VideoLimits};

/// One media part of the request.
#[derive(Debug, Clone)]
pub struct MediaRef {
    /// Where the URL sits in the request, for error messages (`messages[0].content[1].image_url.url`).
    pub param: String,
    pub url: String,
    /// `None` for an image; the number of frames to sample for a video.
    pub frames: Option<usize>,
}

/// A decoded media part: one image, or the sampled frames of a video and their indices.
pub enum Resolved {
    Image(DynamicImage),
    Video { indices: Vec<usize>, frames: Vec<DynamicImage> },
}

/// The request's images and video frames, counted against its limits as the walk over the
/// messages finds them, before anything is fetched.
pub struct SlotBudget<'a> {
    limits: &'a RequestLimits,
    tokens_per_image: usize,
    slots: usize,
}

impl<'a> SlotBudget<'a> {
    pub fn new(state: &'a Loaded) -> Self {
        SlotBudget { limits: &state.limits, tokens_per_image: state.prompts.tokens_per_image(), slots: 0 }
    }

    /// Frames to sample from the video part at `param`: `num_frames`, or the default.
    pub fn frames(&self, param: &str, num_frames: Option<i64>) -> Result<Option<usize>, ApiError> {
        let limits = self.limits;
        match num_frames {
            None => Ok(Some(limits.video_frames)),
            Some(n) if n >= 1 && n as usize <= limits.max_frames_per_request => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid(
                format!("{param}.video_url.num_frames"),
                format!("{n} is outside 1..={}", limits.max_frames_per_request),
            )),
        }
    }

    /// Counts `slots` images or frames of the part at `param`.
    pub fn take(&mut self, param: &str, slots: usize) -> Result<(), ApiError> {
        let limits = self.limits;
        self.slots += slots;
        if self.slots > limits.max_images_per_request {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "more than {} images and video frames in one request (max_images_per_request)",
                    limits.max_images_per_request
                ),
            )
            .with_param(param));
        }
        let visual = self.slots * self.tokens_per_image;
        if visual > limits.max_visual_tokens {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("{visual} visual tokens exceed the limit of {} (max_visual_tokens)", limits.max_visual_tokens),
            )
            .with_param(param));
        }
        Ok(())
    }
}

fn fetch_error(param: &str, e: FetchError) -> ApiError {
    use FetchError::*;
    let kind = match &e {
        TooLarge { .. } | OverBudget(_) | DataUri(weft_media::data_uri::DataUriError::TooLarge { .. }) => {
            ErrorKind::PayloadTooLarge
        }
        Timeout(_) | TooManyRedirects(_) | Status(_) | Network(_) | Dns(_) | LocalRead(_) => {
            ErrorKind::MediaUnprocessable
        }
        _ => ErrorKind::InvalidRequest,
    };
    ApiError { kind, message: e.to_string(), param: Some(param.to_string()) }
}

fn video_error(param: &str, e: VideoError) -> ApiError {
    let kind = match &e {
        VideoError::UnknownFormat | VideoError::FfmpegMissing => ErrorKind::UnsupportedMediaType,
        VideoError::TooManyPixels { .. } | VideoError::TooManyFrames { .. } => ErrorKind::PayloadTooLarge,
        _ => ErrorKind::MediaUnprocessable,
    };
    ApiError { kind, message: e.to_string(), param: Some(param.to_string()) }
}

fn image_error(param: &str, e: weft_media::image_decode::ImageError) -> ApiError {
    use weft_media::image_decode::ImageError::*;
    let kind = match e {
        UnknownFormat | TypeMismatch { .. } => ErrorKind::UnsupportedMediaType,
        TooManyPixels { .. } => ErrorKind::PayloadTooLarge,
        Decode(_) => ErrorKind::MediaUnprocessable,
    };
    ApiError { kind, message: e.to_string(), param: Some(param.to_string()) }
}

async fn resolve_one(state: &Loaded, r: &MediaRef, budget: &ByteBudget) -> Result<Resolved, ApiError> {
    let limits = &state.limits;
    let fetched = fetch(&r.url, &state.fetch_policy, limits.max_image_bytes, limits.media_timeout, budget)
        .await
        .map_err(|e| fetch_error(&r.param, e))?;
    let started = Instant::now();
    let resolved = match r.frames {
        None => {
            let max_pixels = limits.max_image_pixels;
            let param = r.param.clone();
            let image = tokio::task::spawn_blocking(move || {
                weft_media::image_decode::decode(&fetched.bytes, fetched.declared_type.as_deref(), max_pixels)
                    .map_err(|e| image_error(&param, e))
            })
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))??;
            metrics::histogram!("weft:media_decode_seconds", "kind" => "image").record(started.elapsed().as_secs_f64());
            Resolved::Image(image)
        }
        Some(n) => {
            let video_limits = VideoLimits {
                max_pixels: limits.max_image_pixels,
                max_frames: limits.max_video_frames,
                timeout: limits.media_timeout,
            };
            let (indices, frames) =
                sample_video(fetched.bytes, n, &video_limits).await.map_err(|e| video_error(&r.param, e))?;
            Resolved::Video { indices, frames }
        }
    };
    Ok(resolved)
}

/// Fetches and decodes every part concurrently, within the request's time and byte budgets,
/// once one of the `media_concurrency` slots is free.
pub async fn resolve_media(state: &Loaded, refs: &[MediaRef]) -> Result<Vec<Resolved>, ApiError> {
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let limits = &state.limits;
    let budget = ByteBudget::new(limits.max_media_bytes_per_request);
    // Waiting for a slot is not the client's time: the deadline starts once work starts (the
    // wait is bounded by the admission places, and ends if the client goes away).
    let _slot = state.media_slots.acquire().await.map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    let work = futures_util::future::try_join_all(refs.iter().map(|r| resolve_one(state, r, &budget)));
    tokio::time::timeout(limits.media_timeout, work).await.map_err(|_| {
        ApiError::new(
            ErrorKind::MediaUnprocessable,
            format!("fetching the media took longer than {:?}", limits.media_timeout),
        )
        .with_param("messages")
    })?
}
