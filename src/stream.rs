//! Frame sources and queueing for `diffshield run`: a stream of frames from an edge camera (a
//! folder the camera writes into, raw RGB8 frames on a pipe, or a CIFAR-10 file replayed),
//! paced at a target rate and handed to the pipeline through a bounded queue.
//!
//! - A [`FrameSource`] yields decoded frames, blocking until one is ready: [`FolderSource`]
//!   (image files, optionally watching for new ones), [`RawSource`] (raw interleaved RGB8 from
//!   any reader, e.g. stdin), [`CifarSource`] (CIFAR-10 records, with labels).
//! - [`spawn_producer`] runs a source on its own thread at the camera rate and pushes stamped
//!   [`Frame`]s into a [`FrameQueue`].
//! - [`FrameQueue`] is a bounded FIFO: when the consumer falls behind, the oldest queued frame
//!   is dropped (a live camera wants the newest frame) and counted.
//! - [`LatencySummary`] condenses per-frame latencies into the line the CLI prints last.
//!
//! Every frame image is CHW `[3, 32, 32]` `f32` RGB in \[0,1\] (byte / 255): files and raw frames
//! of any other size are resized (shorter side to 32, Triangle filter) and centre-cropped
//! exactly like [`crate::data::load_image`].

use crate::data::cifar::{CIFAR_CLASSES, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES, CIFAR_SIDE};
use crate::data::image::{collect_image_paths, list_folder_images, load_image, raw_rgb8_to_chw};
use crate::error::{Error, Result};
use ndarray::Array3;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Default output size `(h, w)` in pixels of the sources' frames: the shipped models' 32x32
/// input (`with_size` sets another; [`crate::Defense::input_size`] is the models' own).
pub const FRAME_SIZE: (usize, usize) = (CIFAR_SIDE, CIFAR_SIDE);

/// How often (100 ms) a watching [`FolderSource`] lists its folder again for new files, and
/// waits between two tries of a file that does not decode yet.
pub const WATCH_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long (1 s) a watching [`FolderSource`] keeps retrying a file that fails to decode (it
/// may still be being written) before reporting the error.
pub const WATCH_RETRY_WINDOW: Duration = Duration::from_secs(1);

/// Largest raw frame [`RawSource`] accepts, in bytes (1 GiB; a 4K RGB8 frame is ~25 MB).
pub const MAX_RAW_FRAME_BYTES: u64 = 1 << 30;

/// One decoded frame ready for the pipeline.
#[derive(Debug, Clone)]
pub struct Frame {
    /// 0-based arrival order: the producer numbers the frames it pushes 0, 1, 2, ...
    /// (dropped frames keep their numbers, so gaps show drops).
    pub index: u64,
    /// Where the frame came from: the file path, or `NAME#k` for record/frame `k` (0-based) of
    /// a stream (`stdin#3`, `data/test_batch.bin#17`).
    pub source: String,
    /// The image, CHW `[3, 32, 32]` `f32` RGB in \[0,1\].
    pub image: Array3<f32>,
    /// When the producer pushed the frame into the queue (after any pacing wait): latency is
    /// measured from here.
    pub arrived: Instant,
    /// The true class (0..=9) where the source knows it (CIFAR-10 records), else `None`.
    pub label: Option<u8>,
}

/// What a [`FrameSource`] yields for one frame: `(source name, CHW [3, 32, 32] image in \[0,1\],
/// class label where known)`; the producer adds [`Frame::index`] and [`Frame::arrived`].
pub type SourceFrame = (String, Array3<f32>, Option<u8>);

/// A blocking source of frames.
///
/// `next_frame` returns `Ok(Some((source, image, label)))` for the next frame, where `source`
/// names it (see [`Frame::source`]), `image` is CHW `[3, 32, 32]` `f32` in \[0,1\] and `label` is
/// its class where known; `Ok(None)` at the end of the stream; `Err` where the frame cannot be
/// read or decoded. It may block (a watching folder waits for new files).
pub trait FrameSource: Send {
    /// The next frame, `Ok(None)` at the end of the stream. See the trait doc.
    fn next_frame(&mut self) -> Result<Option<SourceFrame>>;
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next_frame(&mut self) -> Result<Option<SourceFrame>> {
        (**self).next_frame()
    }
}

// ---------------------------------------------------------------- folder

/// The images of a folder, in file-name order, each loaded with [`load_image`] at
/// [`FRAME_SIZE`] (the source name is the file's path).
///
/// Without `watch` the folder is listed once, at construction. With `watch`, after the files
/// present at construction the folder is listed again every [`WATCH_POLL_INTERVAL`] (100 ms)
/// and files whose names have not been seen before are delivered, each poll's new files in
/// name order, forever: the stream never ends and `next_frame` blocks while no new file comes
/// (stop it with the producer's `limit`, or end the process). A file is read once its size
/// has stayed the same for one poll (100 ms), so that one still being written is waited for; a
/// file that fails to decode (it may still be being written) is retried every 100 ms for up to [`WATCH_RETRY_WINDOW`]
/// (1 s) before its error is returned; the next call goes on with the following file. A file
/// rewritten under a name already seen is not read again. Writers should create files
/// atomically (write a hidden `.name` or non-image name, then rename), as hidden files and
/// other extensions are ignored.
#[derive(Debug)]
pub struct FolderSource {
    folder: PathBuf,
    watch: bool,
    pending: VecDeque<PathBuf>,
    seen: HashSet<OsString>,
    failing_since: Option<Instant>,
    size: (usize, usize),
    /// The front file's size when last looked at, while watching.
    last_size: Option<(PathBuf, u64)>,
}

impl FolderSource {
    /// Lists `folder` (see the type doc).
    ///
    /// Without `watch`, `folder` may also be a single image file (taken as is, like
    /// [`collect_image_paths`]); with `watch` it must be a folder and may be empty.
    ///
    /// Errors: [`Error::Io`] where the path is missing or unreadable, or (kind
    /// `InvalidInput`) where, without `watch`, the folder holds no image;
    /// [`Error::InvalidConfig`] where `watch` is asked for a path that is not a folder.
    pub fn new(folder: impl Into<PathBuf>, watch: bool) -> Result<Self> {
        let folder = folder.into();
        let paths = if watch {
            let meta =
                fs::metadata(&folder).map_err(|e| Error::Io { path: folder.clone(), source: e })?;
            if !meta.is_dir() {
                return Err(Error::InvalidConfig(format!(
                    "watching needs a folder, {} is not one",
                    folder.display()
                )));
            }
            list_folder_images(&folder)?
        } else {
            collect_image_paths(std::slice::from_ref(&folder))?
        };
        let mut source = FolderSource {
            folder,
            watch,
            pending: VecDeque::new(),
            seen: HashSet::new(),
            failing_since: None,
            size: FRAME_SIZE,
            last_size: None,
        };
        source.enqueue_new(paths);
        Ok(source)
    }

    /// Frames fitted to `size = (h, w)` pixels instead of [`FRAME_SIZE`].
    pub fn with_size(mut self, size: (usize, usize)) -> Self {
        self.size = size;
        self
    }

    /// The folder (or file) this source reads.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Number of listed files not delivered yet (more may appear while watching).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues the paths (already in name order) whose names are new.
    fn enqueue_new(&mut self, paths: Vec<PathBuf>) {
        for path in paths {
            let name = path.file_name().map_or_else(|| path.clone().into_os_string(), Into::into);
            if self.seen.insert(name) {
                self.pending.push_back(path);
            }
        }
    }
}

impl FrameSource for FolderSource {
    fn next_frame(&mut self) -> Result<Option<SourceFrame>> {
        loop {
            if let Some(path) = self.pending.front() {
                // While watching, a file is read only once its size has held for a poll: a
                // camera still writing it would otherwise be read half-way.
                if self.watch {
                    let meta = fs::metadata(path).ok();
                    let size = meta.as_ref().map(|m| m.len());
                    // A file untouched for a poll is complete already; only fresh ones wait.
                    let settled = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age >= WATCH_POLL_INTERVAL);
                    let stable = settled
                        || matches!(&self.last_size, Some((p, s)) if p == path && Some(*s) == size);
                    if !stable {
                        self.last_size = size.map(|s| (path.clone(), s));
                        if size.is_some() {
                            thread::sleep(WATCH_POLL_INTERVAL);
                            continue;
                        }
                    }
                }
                match load_image(path, self.size) {
                    Ok(image) => {
                        let name = path.display().to_string();
                        self.pending.pop_front();
                        self.failing_since = None;
                        return Ok(Some((name, image, None)));
                    }
                    Err(e) => {
                        if self.watch {
                            let since = *self.failing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() < WATCH_RETRY_WINDOW {
                                thread::sleep(WATCH_POLL_INTERVAL);
                                continue;
                            }
                        }
                        self.pending.pop_front();
                        self.failing_since = None;
                        return Err(e);
                    }
                }
            }
            if !self.watch {
                return Ok(None);
            }
            thread::sleep(WATCH_POLL_INTERVAL);
            let listed = list_folder_images(&self.folder)?;
            self.enqueue_new(listed);
        }
    }
}

// ---------------------------------------------------------------- raw RGB8

/// Raw 8-bit RGB frames read back to back from a reader (stdin in the CLI): each frame is
/// `width * height * 3` bytes, interleaved HWC (row 0 first, left to right, `R G B` per
/// pixel), converted like an image file of that size (see [`raw_rgb8_to_chw`]: shorter side
/// resized to 32, centre crop). Frame `k` (0-based) is named `NAME#k`.
///
/// The stream ends cleanly at end of input on a frame boundary; a final frame cut short is an
/// error ([`Error::Shape`] naming the frame and both byte counts).
#[derive(Debug)]
pub struct RawSource<R: Read + Send> {
    reader: R,
    name: String,
    width: u32,
    height: u32,
    buf: Vec<u8>,
    next: u64,
    done: bool,
    size: (usize, usize),
}

impl<R: Read + Send> RawSource<R> {
    /// Frames of `width` x `height` pixels from `reader`, named `name#k` (`name` e.g. `stdin`).
    ///
    /// Errors: [`Error::InvalidConfig`] where `width` or `height` is 0, or a frame would exceed
    /// [`MAX_RAW_FRAME_BYTES`].
    pub fn new(reader: R, name: impl Into<String>, width: u32, height: u32) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidConfig(format!(
                "raw frame size {width}x{height} (width x height, pixels) must be non-zero"
            )));
        }
        let bytes = u64::from(width) * u64::from(height) * 3;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > crate::data::image::MAX_IMAGE_PIXELS {
            return Err(Error::InvalidConfig(format!(
                "raw frame size {width}x{height} is {pixels} pixels, more than the {} allowed",
                crate::data::image::MAX_IMAGE_PIXELS
            )));
        }
        if bytes > MAX_RAW_FRAME_BYTES {
            return Err(Error::InvalidConfig(format!(
                "raw frame size {width}x{height} is {bytes} bytes per frame, more than the \
                 {MAX_RAW_FRAME_BYTES} allowed"
            )));
        }
        let len = usize::try_from(bytes).map_err(|_| {
            Error::InvalidConfig(format!("raw frame size {width}x{height} is too large"))
        })?;
        Ok(RawSource {
            reader,
            name: name.into(),
            width,
            height,
            buf: vec![0; len],
            next: 0,
            done: false,
            size: FRAME_SIZE,
        })
    }

    /// Frames fitted to `size = (h, w)` pixels instead of [`FRAME_SIZE`].
    pub fn with_size(mut self, size: (usize, usize)) -> Self {
        self.size = size;
        self
    }

    /// Bytes of one frame: `width * height * 3`.
    pub fn frame_bytes(&self) -> usize {
        self.buf.len()
    }
}

impl<R: Read + Send> FrameSource for RawSource<R> {
    fn next_frame(&mut self) -> Result<Option<SourceFrame>> {
        if self.done {
            return Ok(None);
        }
        let want = self.buf.len();
        let mut got = 0;
        while got < want {
            match self.reader.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    return Err(Error::Io { path: PathBuf::from(&self.name), source: e });
                }
            }
        }
        let k = self.next;
        if got == 0 {
            self.done = true;
            return Ok(None);
        }
        if got < want {
            self.done = true;
            return Err(Error::Shape {
                expected: format!(
                    "raw frame {k} of {} to hold {}*{}*3 = {want} bytes",
                    self.name, self.width, self.height
                ),
                got: format!("{got} bytes (the input ended mid-frame)"),
            });
        }
        let image = raw_rgb8_to_chw(&self.buf, self.width, self.height, self.size)?;
        self.next += 1;
        Ok(Some((format!("{}#{k}", self.name), image, None)))
    }
}

// ---------------------------------------------------------------- CIFAR-10

/// The records of a CIFAR-10 binary file, streamed in file order with their labels; record `k`
/// (0-based) is named `PATH#k`. Only one record (3073 bytes) is held in memory at a time.
///
/// The file size is checked when opening (a non-zero multiple of 3073 bytes), labels as each
/// record is read, as [`crate::data::read_cifar_bin`] does.
#[derive(Debug)]
pub struct CifarSource {
    path: PathBuf,
    reader: BufReader<File>,
    records: u64,
    next: u64,
    buf: Vec<u8>,
}

impl CifarSource {
    /// Opens a CIFAR-10 `.bin` file.
    ///
    /// Errors: [`Error::Io`] where it is missing or unreadable; [`Error::Cifar`] where it is
    /// not a regular file, empty or not a whole number of records.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let (file, records) = crate::data::cifar::open_records(&path)?;
        Ok(CifarSource {
            reader: BufReader::new(file),
            path,
            records,
            next: 0,
            buf: vec![0; CIFAR_RECORD_BYTES],
        })
    }

    /// Number of records in the file (as sized when opened).
    pub fn records(&self) -> u64 {
        self.records
    }
}

impl FrameSource for CifarSource {
    fn next_frame(&mut self) -> Result<Option<SourceFrame>> {
        let k = self.next;
        if k >= self.records {
            return Ok(None);
        }
        self.reader.read_exact(&mut self.buf).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::Cifar {
                path: self.path.clone(),
                reason: format!("record {k} is cut short (file changed while reading?)"),
            },
            _ => Error::Io { path: self.path.clone(), source: e },
        })?;
        self.next += 1;
        let label = self.buf[0];
        if label >= CIFAR_CLASSES {
            return Err(Error::Cifar {
                path: self.path.clone(),
                reason: format!(
                    "record {k} (0-based, at byte offset {}) has label {label}, expected 0..=9",
                    k * CIFAR_RECORD_BYTES as u64
                ),
            });
        }
        let pixels: Vec<f32> = self.buf[1..].iter().map(|&b| f32::from(b) / 255.0).collect();
        debug_assert_eq!(pixels.len(), CIFAR_IMAGE_BYTES);
        let image = Array3::from_shape_vec((3, CIFAR_SIDE, CIFAR_SIDE), pixels).map_err(|e| {
            Error::Cifar { path: self.path.clone(), reason: format!("internal shape error: {e}") }
        })?;
        Ok(Some((format!("{}#{k}", self.path.display()), image, Some(label))))
    }
}

// ---------------------------------------------------------------- queue

/// Bounded FIFO of frames between the producer (camera rate) and the consumer (pipeline).
///
/// When full, [`push`](Self::push) drops the OLDEST queued frame to make room (a live stream
/// wants the newest frames) and counts it in [`dropped`](Self::dropped). Safe to share between
/// threads (`Arc<FrameQueue>`).
#[derive(Debug)]
pub struct FrameQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

#[derive(Debug)]
struct QueueState {
    frames: VecDeque<Frame>,
    closed: bool,
    dropped: u64,
    rejected: u64,
    pushed: u64,
}

impl FrameQueue {
    /// An empty, open queue holding at most `capacity` frames.
    ///
    /// Errors: [`Error::InvalidConfig`] where `capacity` is 0.
    pub fn new(capacity: usize) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::InvalidConfig("frame queue capacity must be at least 1".into()));
        }
        Ok(FrameQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
                dropped: 0,
                rejected: 0,
                pushed: 0,
            }),
            ready: Condvar::new(),
            capacity,
        })
    }

    /// The state; a panic while holding the lock cannot leave it inconsistent (every update is
    /// a single push/pop/flag), so a poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `frame`; where the queue is full, first drops its oldest frame and counts it.
    /// Returns true where a frame was dropped. On a closed queue `frame` is discarded (not
    /// counted as dropped) and false is returned.
    pub fn push(&self, frame: Frame) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        st.pushed += 1;
        let mut dropped = false;
        while st.frames.len() >= self.capacity {
            st.frames.pop_front();
            st.dropped += 1;
            dropped = true;
        }
        st.frames.push_back(frame);
        drop(st);
        self.ready.notify_all();
        dropped
    }

    /// Appends `frame`, first waiting while the queue is full (back-pressure: nothing is
    /// dropped). For sources with no rate of their own, such as files read as fast as the
    /// consumer takes them. On a closed queue `frame` is discarded.
    pub fn push_wait(&self, frame: Frame) {
        let mut st = self.lock();
        while st.frames.len() >= self.capacity && !st.closed {
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.closed {
            return;
        }
        st.pushed += 1;
        st.frames.push_back(frame);
        drop(st);
        self.ready.notify_all();
    }

    /// The oldest frame, blocking until there is one; `None` once the queue is closed and
    /// empty (frames queued before [`close`](Self::close) are still delivered).
    pub fn pop(&self) -> Option<Frame> {
        self.pop_until(None)
    }

    /// Like [`pop`](Self::pop) but waits at most `timeout`; `None` on timeout or where the
    /// queue is closed and empty ([`is_closed`](Self::is_closed) tells which).
    pub fn pop_timeout(&self, timeout: Duration) -> Option<Frame> {
        // A timeout too large for the clock waits without a deadline.
        self.pop_until(Some(Instant::now().checked_add(timeout)).flatten())
    }

    fn pop_until(&self, deadline: Option<Instant>) -> Option<Frame> {
        let mut st = self.lock();
        loop {
            if let Some(frame) = st.frames.pop_front() {
                drop(st);
                // A producer in push_wait may be waiting for the room just made.
                self.ready.notify_all();
                return Some(frame);
            }
            if st.closed {
                return None;
            }
            st = match deadline {
                None => self.ready.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    self.ready
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Closes the queue: later pushes are discarded, and once the queued frames are popped
    /// every waiting and later `pop` returns `None`. Idempotent.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// True once [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Number of frames dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Counts a frame the producer could not read and skipped.
    pub fn reject(&self) {
        self.lock().rejected += 1;
    }

    /// Number of frames accepted into the queue so far (classified, queued or dropped later).
    pub fn pushed(&self) -> u64 {
        self.lock().pushed
    }

    /// Number of frames skipped so far because they could not be read or decoded.
    pub fn rejected(&self) -> u64 {
        self.lock().rejected
    }

    /// Closes the queue and discards the frames still in it, counting them as dropped: what an
    /// interrupted stream does with frames it will not classify. Returns how many.
    pub fn abandon(&self) -> u64 {
        let mut st = self.lock();
        st.closed = true;
        let n = st.frames.len() as u64;
        st.frames.clear();
        st.dropped += n;
        drop(st);
        self.ready.notify_all();
        n
    }

    /// Number of frames queued now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// True where no frame is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most frames the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

// ---------------------------------------------------------------- producer

/// Closes the queue when the producer ends, whether it returns, fails or panics.
struct CloseOnDrop(Arc<FrameQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs `source` on a new thread, stamping each frame with its [`Frame::index`] (0, 1, ...)
/// and [`Frame::arrived`] and pushing it into `queue`.
///
/// `rate_hz`: frames per second (Hz). Frame `k` is released no earlier than
/// `start + k / rate_hz` seconds, `start` being when the thread starts: an absolute schedule,
/// so decoding time does not add up into drift (a source slower than the rate makes frames
/// late; the ones behind schedule are then released at once) and a full queue drops its
/// oldest frame, as a camera would. `None` releases frames as fast as the consumer takes them:
/// a full queue makes the producer wait (back-pressure), so nothing is dropped.
///
/// Stops after `limit` frames (before asking the source for more, so a watching folder is not
/// waited on), at the end of the stream, at the source's first error that is not about one
/// frame (frames that do not decode, [`is_frame_error`], are skipped, logged and counted in
/// [`FrameQueue::rejected`]), or when the queue is closed by someone else; the queue is closed
/// in every case (also on a panic).
///
/// The thread's result is the number of frames pushed, or the source's error (frames pushed
/// before it stay queued). Refused with [`Error::InvalidConfig`], the queue then closed: a
/// `rate_hz` that is not finite or below [`MIN_RATE_HZ`] (before the thread starts), and a
/// thread the OS will not start (a process at its thread limit).
pub fn spawn_producer(
    mut source: Box<dyn FrameSource>,
    rate_hz: Option<f64>,
    limit: Option<u64>,
    queue: Arc<FrameQueue>,
) -> Result<JoinHandle<Result<u64>>> {
    if let Err(e) = check_rate(rate_hz) {
        queue.close();
        return Err(e);
    }
    let closer = CloseOnDrop(Arc::clone(&queue));
    thread::Builder::new()
        .name("diffshield-frames".into())
        .spawn(move || {
            let _close = closer;
            produce(&mut *source, rate_hz, limit, &queue)
        })
        .map_err(|e| {
            Error::InvalidConfig(format!(
                "cannot start the frame reader thread ({e}); the process may be at its thread \
                 limit (ulimit -u)"
            ))
        })
}

/// Slowest frame rate a stream takes: one frame a day (Hz). Slower is a typo (`--rate 1e-9`
/// would wait 31 years for its second frame), not a camera.
pub const MIN_RATE_HZ: f64 = 1.0 / 86_400.0;

/// Refuses a rate that is not finite or below [`MIN_RATE_HZ`].
fn check_rate(rate_hz: Option<f64>) -> Result<()> {
    match rate_hz {
        Some(rate) if !(rate.is_finite() && rate >= MIN_RATE_HZ) => {
            Err(Error::InvalidConfig(format!(
                "frame rate {rate} Hz must be finite and at least {MIN_RATE_HZ:.3e} Hz (one \
                 frame a day)"
            )))
        }
        _ => Ok(()),
    }
}

/// Whether a source's error concerns one frame (a file that does not decode, bad pixels), so
/// that the stream can go on without it, rather than the source itself (a folder that cannot
/// be listed, a raw stream cut mid-frame, a broken CIFAR file).
pub fn is_frame_error(e: &Error) -> bool {
    matches!(e, Error::Image { .. } | Error::Pixels { .. })
}

fn produce(
    source: &mut dyn FrameSource,
    rate_hz: Option<f64>,
    limit: Option<u64>,
    queue: &FrameQueue,
) -> Result<u64> {
    let start = Instant::now();
    let mut produced = 0u64;
    while limit.is_none_or(|l| produced < l) && !queue.is_closed() {
        let next = match source.next_frame() {
            Ok(next) => next,
            // One unreadable file must not end a camera's stream: skip it, say so, count it.
            Err(e) if is_frame_error(&e) => {
                log::warn!("skipped a frame: {e}");
                queue.reject();
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some((name, image, label)) = next else {
            break;
        };
        if let Some(rate) = rate_hz {
            let due = Duration::try_from_secs_f64(produced as f64 / rate)
                .ok()
                .and_then(|offset| start.checked_add(offset))
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "frame rate {rate} Hz is too low: frame {produced} would be due beyond \
                         the clock's range"
                    ))
                })?;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        if queue.is_closed() {
            break;
        }
        let frame = Frame { index: produced, source: name, image, arrived: Instant::now(), label };
        if rate_hz.is_some() {
            queue.push(frame);
        } else {
            queue.push_wait(frame);
        }
        produced += 1;
    }
    Ok(produced)
}

// ---------------------------------------------------------------- latency summary

/// Summary of a run's per-frame latencies, printed by the CLI as its last line.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Frames classified (the number of latencies summarised).
    pub frames: u64,
    /// Frames whose result came after their deadline.
    pub deadline_missed: u64,
    /// Frames dropped by the queue before being classified (also those still queued when the
    /// stream was interrupted).
    pub dropped: u64,
    /// Frames the source could not read or decode, skipped (each reported on stderr).
    pub rejected: u64,
    /// Frames the source delivered: every one is classified, dropped or rejected, so
    /// `received = frames + dropped + rejected`.
    pub received: u64,
    /// Whether the stream was stopped by a signal (SIGINT, SIGTERM) or the caller's stop flag.
    pub interrupted: bool,
    /// Median latency in milliseconds (nearest rank).
    pub p50_ms: f64,
    /// 95th-percentile latency in milliseconds (nearest rank).
    pub p95_ms: f64,
    /// 99th-percentile latency in milliseconds (nearest rank).
    pub p99_ms: f64,
}

impl LatencySummary {
    /// Summarises `latencies_s` (seconds, any order) with the given counts. Percentiles use
    /// the nearest-rank method: the p-th percentile of n sorted values is the value of rank
    /// `ceil(p/100 * n)` (1-based, at least 1), so it is always one of the inputs. No input
    /// gives 0 for every percentile. Values are ordered with [`f64::total_cmp`].
    pub fn from_latencies(latencies_s: &[f64], deadline_missed: u64, dropped: u64) -> Self {
        let sorted = crate::stats::sorted(latencies_s.iter().copied());
        let ms = |p: f64| crate::stats::percentile(&sorted, p).map_or(0.0, |s| s * 1e3);
        LatencySummary {
            frames: sorted.len() as u64,
            deadline_missed,
            dropped,
            rejected: 0,
            received: sorted.len() as u64 + dropped,
            interrupted: false,
            p50_ms: ms(50.0),
            p95_ms: ms(95.0),
            p99_ms: ms(99.0),
        }
    }
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "frames={} deadline_missed={} dropped={} rejected={}{} latency_ms p50={:.1} p95={:.1} \
             p99={:.1}",
            self.frames,
            self.deadline_missed,
            self.dropped,
            self.rejected,
            if self.interrupted { " interrupted" } else { "" },
            self.p50_ms,
            self.p95_ms,
            self.p99_ms
        )
    }
}
