//! weft-media: turning media into decoded frames. For now: frame sampling and in-process
//! decoding of animated images; fetching and limits arrive with the media issue.

pub mod video;
