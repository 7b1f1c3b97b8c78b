//! Integration tests of `diffshield::stream`: frame sources (folder, watched folder, raw RGB8,
//! CIFAR-10), the drop-oldest bounded queue, the paced producer and the latency summary.

use diffshield::data::image::{load_image, save_png};
use diffshield::stream::{
    spawn_producer, CifarSource, FolderSource, Frame, FrameQueue, FrameSource, LatencySummary,
    RawSource,
};
use diffshield::Error;
use ndarray::Array3;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fresh, empty folder unique to this test (and process).
fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffshield-stream-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `[3, h, w]` image with every value `v / 255`.
fn flat(h: usize, w: usize, v: u8) -> Array3<f32> {
    Array3::from_elem((3, h, w), f32::from(v) / 255.0)
}

/// Writes a flat PNG of value `v` at `path`.
fn write_flat_png(path: &Path, v: u8) {
    save_png(path, flat(32, 32, v).view()).unwrap();
}

/// The byte value of a flat frame.
fn value_of(image: &Array3<f32>) -> u8 {
    (image[[0, 0, 0]] * 255.0).round() as u8
}

/// Pops every frame until the queue is closed and empty.
fn drain(queue: &FrameQueue) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = queue.pop_timeout(Duration::from_secs(30)) {
        out.push(f);
    }
    assert!(queue.is_closed(), "pop timed out before the producer closed the queue");
    out
}

/// Runs `source` through a producer into a large queue and returns all its frames.
fn produce_all(source: Box<dyn FrameSource>, limit: Option<u64>) -> (u64, Vec<Frame>) {
    let queue = Arc::new(FrameQueue::new(1000).unwrap());
    let handle = spawn_producer(source, None, limit, Arc::clone(&queue)).unwrap();
    let frames = drain(&queue);
    let produced = handle.join().expect("producer panicked").expect("producer failed");
    assert_eq!(queue.dropped(), 0);
    (produced, frames)
}

fn frame(index: u64) -> Frame {
    Frame {
        index,
        source: format!("test#{index}"),
        image: flat(32, 32, index as u8),
        arrived: Instant::now(),
        label: None,
    }
}

/// A source giving flat frames forever.
struct Endless(u64);

impl FrameSource for Endless {
    fn next_frame(&mut self) -> diffshield::Result<Option<(String, Array3<f32>, Option<u8>)>> {
        self.0 += 1;
        Ok(Some((format!("endless#{}", self.0 - 1), flat(32, 32, 7), None)))
    }
}

// ---------------------------------------------------------------- ordering

#[test]
fn folder_frames_come_in_file_name_order() {
    let dir = temp_dir("folder_order");
    // Written out of order; "10" sorts before "2" by name.
    let names = ["c.png", "10.png", "a.png", "2.png", "b.ppm"];
    for (v, name) in names.iter().enumerate() {
        if name.ends_with(".ppm") {
            let mut ppm = b"P6\n32 32\n255\n".to_vec();
            ppm.extend(std::iter::repeat_n(v as u8 * 10, 32 * 32 * 3));
            std::fs::write(dir.join(name), ppm).unwrap();
        } else {
            write_flat_png(&dir.join(name), v as u8 * 10);
        }
    }
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.join(".hidden.png"), "not listed").unwrap();

    let (produced, frames) = produce_all(Box::new(FolderSource::new(&dir, false).unwrap()), None);
    assert_eq!(produced, 5);
    let got: Vec<String> = frames
        .iter()
        .map(|f| Path::new(&f.source).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(got, ["10.png", "2.png", "a.png", "b.ppm", "c.png"]);
    let values: Vec<u8> = frames.iter().map(|f| value_of(&f.image)).collect();
    assert_eq!(values, [10, 30, 20, 40, 0]);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.index, i as u64);
        assert_eq!(f.image.dim(), (3, 32, 32));
        assert_eq!(f.label, None);
    }
    // Arrival stamps follow the order.
    assert!(frames.windows(2).all(|w| w[0].arrived <= w[1].arrived));

    // A limit stops early.
    let (produced, frames) =
        produce_all(Box::new(FolderSource::new(&dir, false).unwrap()), Some(2));
    assert_eq!((produced, frames.len()), (2, 2));

    // An empty folder is an error without watching, fine with it.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        FolderSource::new(&empty, false),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidInput
    ));
    assert!(FolderSource::new(&empty, true).is_ok());
    // Watching a file is refused.
    assert!(matches!(FolderSource::new(dir.join("a.png"), true), Err(Error::InvalidConfig(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

fn cifar_record(label: u8, v: u8) -> Vec<u8> {
    let mut rec = vec![label];
    rec.extend((0..3072).map(|i| v.wrapping_add((i % 7) as u8)));
    rec
}

#[test]
fn cifar_records_come_in_file_order_with_labels() {
    let dir = temp_dir("cifar_order");
    let path = dir.join("test_batch.bin");
    let labels = [3u8, 1, 4, 1, 5, 9];
    let bytes: Vec<u8> =
        labels.iter().enumerate().flat_map(|(i, &l)| cifar_record(l, i as u8 * 20)).collect();
    std::fs::write(&path, &bytes).unwrap();

    let source = CifarSource::open(&path).unwrap();
    assert_eq!(source.records(), 6);
    let (produced, frames) = produce_all(Box::new(source), None);
    assert_eq!(produced, 6);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.index, i as u64);
        assert_eq!(f.label, Some(labels[i]));
        assert_eq!(f.source, format!("{}#{i}", path.display()));
        assert_eq!(f.image.dim(), (3, 32, 32));
        // CHW byte order: pixel byte j of the record is flat element j.
        let rec = &bytes[i * 3073 + 1..(i + 1) * 3073];
        assert!(f.image.iter().zip(rec).all(|(&x, &b)| x == f32::from(b) / 255.0));
    }

    // Limit.
    let (produced, _) = produce_all(Box::new(CifarSource::open(&path).unwrap()), Some(4));
    assert_eq!(produced, 4);

    // Bad size, bad label.
    let bad = dir.join("bad.bin");
    std::fs::write(&bad, &bytes[..3073 + 10]).unwrap();
    let msg = CifarSource::open(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("not a multiple") && msg.contains("(1 whole record and 10 bytes"),
        "{msg}"
    );
    let mut wrong = cifar_record(0, 0);
    wrong.extend(cifar_record(12, 0));
    std::fs::write(&bad, &wrong).unwrap();
    let mut src = CifarSource::open(&bad).unwrap();
    assert!(src.next_frame().unwrap().is_some());
    let msg = src.next_frame().unwrap_err().to_string();
    assert!(msg.contains("record 1") && msg.contains("label 12"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- queue

#[test]
fn full_queue_drops_oldest_first_and_counts() {
    assert!(matches!(FrameQueue::new(0), Err(Error::InvalidConfig(_))));
    let q = FrameQueue::new(2).unwrap();
    let dropped: Vec<bool> = (0..5).map(|i| q.push(frame(i))).collect();
    assert_eq!(dropped, [false, false, true, true, true]);
    assert_eq!(q.dropped(), 3);
    assert_eq!(q.len(), 2);
    q.close();
    assert_eq!(q.pop().map(|f| f.index), Some(3));
    assert_eq!(q.pop().map(|f| f.index), Some(4));
    assert!(q.pop().is_none());
    // Pushing onto a closed queue discards, without counting a drop.
    assert!(!q.push(frame(9)));
    assert!(q.is_empty());
    assert_eq!(q.dropped(), 3);
}

#[test]
fn close_unblocks_a_waiting_pop() {
    let q = Arc::new(FrameQueue::new(4).unwrap());
    let waiter = {
        let q = Arc::clone(&q);
        std::thread::spawn(move || {
            let t = Instant::now();
            (q.pop().map(|f| f.index), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished(), "pop returned on an empty, open queue");
    q.close();
    let (got, waited) = waiter.join().unwrap();
    assert_eq!(got, None);
    assert!(waited >= Duration::from_millis(90), "{waited:?}");

    // A pop waiting on an empty queue gets a frame pushed later; pop_timeout times out.
    let q = Arc::new(FrameQueue::new(4).unwrap());
    assert!(q.pop_timeout(Duration::from_millis(20)).is_none());
    assert!(!q.is_closed());
    let waiter = {
        let q = Arc::clone(&q);
        std::thread::spawn(move || q.pop().map(|f| f.index))
    };
    std::thread::sleep(Duration::from_millis(20));
    q.push(frame(42));
    assert_eq!(waiter.join().unwrap(), Some(42));
}

// ---------------------------------------------------------------- producer

#[test]
fn producer_paces_frames_at_the_rate() {
    let queue = Arc::new(FrameQueue::new(100).unwrap());
    let t = Instant::now();
    let handle =
        spawn_producer(Box::new(Endless(0)), Some(50.0), Some(10), Arc::clone(&queue)).unwrap();
    let frames = drain(&queue);
    let elapsed = t.elapsed();
    assert_eq!(handle.join().unwrap().unwrap(), 10);
    assert_eq!(frames.len(), 10);
    // Frame 9 is due 9/50 s = 180 ms after the start.
    assert!(elapsed >= Duration::from_millis(175), "10 frames at 50 Hz took {elapsed:?}");
    let span = frames[9].arrived - frames[0].arrived;
    assert!(span >= Duration::from_millis(175), "arrivals spanned {span:?}");
    assert!(frames.iter().enumerate().all(|(i, f)| f.index == i as u64));
    assert_eq!(frames[3].source, "endless#3");

    // Without a rate, frames come as fast as the source gives them.
    let queue = Arc::new(FrameQueue::new(1000).unwrap());
    let t = Instant::now();
    let handle = spawn_producer(Box::new(Endless(0)), None, Some(200), Arc::clone(&queue)).unwrap();
    assert_eq!(handle.join().unwrap().unwrap(), 200);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(queue.len(), 200);
}

#[test]
fn producer_fills_a_slow_consumers_queue_by_dropping() {
    // A paced (camera-like) source drops the oldest frames when the consumer falls behind.
    let queue = Arc::new(FrameQueue::new(3).unwrap());
    let handle =
        spawn_producer(Box::new(Endless(0)), Some(10_000.0), Some(10), Arc::clone(&queue)).unwrap();
    assert_eq!(handle.join().unwrap().unwrap(), 10);
    assert_eq!(queue.dropped(), 7);
    let idx: Vec<u64> = drain(&queue).iter().map(|f| f.index).collect();
    assert_eq!(idx, [7, 8, 9]);
}

#[test]
fn unpaced_producer_waits_for_a_slow_consumer_and_drops_nothing() {
    let queue = Arc::new(FrameQueue::new(3).unwrap());
    let handle = spawn_producer(Box::new(Endless(0)), None, Some(10), Arc::clone(&queue)).unwrap();
    let mut idx = Vec::new();
    while let Some(f) = queue.pop() {
        std::thread::sleep(Duration::from_millis(2));
        idx.push(f.index);
    }
    assert_eq!(handle.join().unwrap().unwrap(), 10);
    assert_eq!(idx, (0..10).collect::<Vec<u64>>());
    assert_eq!(queue.dropped(), 0);
}

#[test]
fn producer_refuses_bad_rates_and_reports_source_errors() {
    // Refused before a thread starts: a rate that is not a number, or slower than a frame a
    // day (1e-9 Hz would wait 31 years for the second frame).
    for rate in [0.0, -5.0, f64::NAN, f64::INFINITY, 1e-9] {
        let queue = Arc::new(FrameQueue::new(2).unwrap());
        let r = spawn_producer(Box::new(Endless(0)), Some(rate), None, Arc::clone(&queue));
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "rate {rate}: {:?}", r.err());
        assert!(queue.is_closed());
    }
    // A truncated raw stream: the good frame is queued, then the error ends the producer.
    let source = RawSource::new(Cursor::new(vec![9u8; 12 + 5]), "pipe", 2, 2).unwrap();
    let queue = Arc::new(FrameQueue::new(4).unwrap());
    let r =
        spawn_producer(Box::new(source), None, None, Arc::clone(&queue)).unwrap().join().unwrap();
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    assert_eq!(drain(&queue).len(), 1);
    // A consumer closing the queue stops an endless producer.
    let queue = Arc::new(FrameQueue::new(4).unwrap());
    let handle =
        spawn_producer(Box::new(Endless(0)), Some(1000.0), None, Arc::clone(&queue)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    queue.close();
    assert!(handle.join().unwrap().unwrap() > 0);
}

// ---------------------------------------------------------------- raw RGB8

/// Deterministic interleaved RGB8 bytes of a `w` x `h` frame.
fn raw_frame(w: usize, h: usize, seed: u8) -> Vec<u8> {
    (0..w * h * 3).map(|i| ((i * 37 + seed as usize * 11) % 251) as u8).collect()
}

#[test]
fn raw_frames_decode_like_image_files() {
    let (w, h) = (40usize, 30usize);
    let frames = [raw_frame(w, h, 1), raw_frame(w, h, 2)];
    let mut src = RawSource::new(Cursor::new(frames.concat()), "stdin", 40, 30).unwrap();
    assert_eq!(src.frame_bytes(), 3600);

    let dir = temp_dir("raw");
    for (k, bytes) in frames.iter().enumerate() {
        let (name, image, label) = src.next_frame().unwrap().expect("a frame");
        assert_eq!(name, format!("stdin#{k}"));
        assert_eq!(label, None);
        assert_eq!(image.dim(), (3, 32, 32));
        // The same pixels as a PNG file load to the same array.
        let chw = Array3::from_shape_fn((3, h, w), |(c, y, x)| {
            f32::from(bytes[(y * w + x) * 3 + c]) / 255.0
        });
        let png = dir.join(format!("f{k}.png"));
        save_png(&png, chw.view()).unwrap();
        assert_eq!(image, load_image(&png, (32, 32)).unwrap(), "frame {k}");
    }
    assert!(src.next_frame().unwrap().is_none(), "clean end on a frame boundary");
    assert!(src.next_frame().unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);

    // A 32x32 raw frame is used pixel for pixel.
    let bytes = raw_frame(32, 32, 3);
    let mut src = RawSource::new(Cursor::new(bytes.clone()), "cam", 32, 32).unwrap();
    let (_, image, _) = src.next_frame().unwrap().unwrap();
    assert_eq!(image[[1, 2, 5]], f32::from(bytes[(2 * 32 + 5) * 3 + 1]) / 255.0);
}

#[test]
fn truncated_last_raw_frame_is_an_error_naming_byte_counts() {
    let mut data = raw_frame(40, 30, 1);
    data.extend(raw_frame(40, 30, 2));
    data.extend(&raw_frame(40, 30, 3)[..1000]);
    let mut src = RawSource::new(Cursor::new(data), "stdin", 40, 30).unwrap();
    assert!(src.next_frame().unwrap().is_some());
    assert!(src.next_frame().unwrap().is_some());
    let err = src.next_frame().unwrap_err();
    let msg = err.to_string();
    eprintln!("expected error: {msg}");
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
    for needle in ["raw frame 2", "40*30*3 = 3600 bytes", "1000 bytes", "stdin"] {
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    }
    assert!(src.next_frame().unwrap().is_none());
}

#[test]
fn zero_raw_frame_size_is_refused() {
    for (w, h) in [(0, 30), (40, 0), (0, 0)] {
        let r = RawSource::new(Cursor::new(Vec::new()), "stdin", w, h);
        match r {
            Err(Error::InvalidConfig(msg)) => assert!(msg.contains("non-zero"), "{msg}"),
            other => panic!("{w}x{h}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert!(matches!(
        RawSource::new(Cursor::new(Vec::new()), "stdin", 100_000, 100_000),
        Err(Error::InvalidConfig(_))
    ));
    // Empty input: no frames, no error.
    let mut src = RawSource::new(Cursor::new(Vec::new()), "stdin", 4, 4).unwrap();
    assert!(src.next_frame().unwrap().is_none());
}

// ---------------------------------------------------------------- watch mode

#[test]
fn watch_mode_picks_up_files_added_later() {
    let dir = temp_dir("watch");
    write_flat_png(&dir.join("a.png"), 10);
    let source = FolderSource::new(&dir, true).unwrap();
    let queue = Arc::new(FrameQueue::new(10).unwrap());
    let handle = spawn_producer(Box::new(source), None, Some(3), Arc::clone(&queue)).unwrap();

    let first = queue.pop_timeout(Duration::from_secs(10)).expect("the existing file");
    assert!(first.source.ends_with("a.png"), "{}", first.source);
    assert_eq!(first.index, 0);

    // A new file appears after start, atomically.
    write_flat_png(&dir.join("b.png"), 20);
    let second = queue.pop_timeout(Duration::from_secs(10)).expect("the file added later");
    assert!(second.source.ends_with("b.png"), "{}", second.source);
    assert_eq!((second.index, value_of(&second.image)), (1, 20));

    // A file written in two steps: the half-written file fails to decode and is retried.
    let mut png = Vec::new();
    write_flat_png(&dir.join(".tmp.png"), 30);
    png.extend(std::fs::read(dir.join(".tmp.png")).unwrap());
    std::fs::write(dir.join("c.png"), &png[..png.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(350));
    std::fs::write(dir.join("c.png"), &png).unwrap();
    let third = queue.pop_timeout(Duration::from_secs(10)).expect("the slowly written file");
    assert!(third.source.ends_with("c.png"), "{}", third.source);
    assert_eq!((third.index, value_of(&third.image)), (2, 30));

    // The limit ends the otherwise endless stream.
    assert_eq!(handle.join().unwrap().unwrap(), 3);
    assert!(queue.pop_timeout(Duration::from_secs(5)).is_none());
    assert!(queue.is_closed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_mode_reports_a_file_that_never_decodes() {
    let dir = temp_dir("watch_bad");
    std::fs::write(dir.join("bad.png"), b"definitely not a png").unwrap();
    write_flat_png(&dir.join("good.png"), 5);
    let mut src = FolderSource::new(&dir, true).unwrap();
    let t = Instant::now();
    let err = src.next_frame().unwrap_err();
    let waited = t.elapsed();
    assert!(err.to_string().contains("bad.png"), "{err}");
    assert!(waited >= Duration::from_millis(900), "gave up after {waited:?}");
    // The stream goes on with the next file.
    let (name, _, _) = src.next_frame().unwrap().unwrap();
    assert!(name.ends_with("good.png"), "{name}");

    // Without watching, a bad file fails at once.
    let mut src = FolderSource::new(&dir, false).unwrap();
    let t = Instant::now();
    assert!(src.next_frame().is_err());
    assert!(t.elapsed() < Duration::from_millis(500));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- latency summary

#[test]
fn latency_percentiles_use_nearest_rank() {
    // 1..=100 ms, shuffled.
    let mut lat: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
    lat.reverse();
    lat.swap(3, 70);
    let s = LatencySummary::from_latencies(&lat, 4, 2);
    assert_eq!((s.frames, s.deadline_missed, s.dropped), (100, 4, 2));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(s.p50_ms, 50.0) && close(s.p95_ms, 95.0) && close(s.p99_ms, 99.0), "{s:?}");

    // 10 values: ranks ceil(5) = 5, ceil(9.5) = 10, ceil(9.9) = 10.
    let lat = [0.010, 0.002, 0.009, 0.004, 0.005, 0.001, 0.007, 0.003, 0.008, 0.006];
    let s = LatencySummary::from_latencies(&lat, 0, 0);
    assert!(close(s.p50_ms, 5.0) && close(s.p95_ms, 10.0) && close(s.p99_ms, 10.0), "{s:?}");

    // One value is every percentile; none gives zeros.
    let s = LatencySummary::from_latencies(&[0.25], 1, 0);
    assert!(close(s.p50_ms, 250.0) && close(s.p99_ms, 250.0), "{s:?}");
    let s = LatencySummary::from_latencies(&[], 0, 7);
    assert_eq!((s.frames, s.p50_ms, s.p95_ms, s.p99_ms, s.dropped), (0, 0.0, 0.0, 0.0, 7));

    let json = serde_json::to_string(&LatencySummary::from_latencies(&lat, 3, 1)).unwrap();
    for key in ["\"frames\":10", "\"deadline_missed\":3", "\"dropped\":1", "\"p50_ms\":5"] {
        assert!(json.contains(key), "{json} lacks {key}");
    }
    assert!(json.contains("p95_ms") && json.contains("p99_ms"));
}

#[test]
fn push_wait_applies_back_pressure_instead_of_dropping() {
    use diffshield::stream::{Frame, FrameQueue};
    use std::sync::Arc;
    let q = Arc::new(FrameQueue::new(1).unwrap());
    let frame = |i| Frame {
        index: i,
        source: format!("f{i}"),
        image: ndarray::Array3::zeros((3, 32, 32)),
        arrived: std::time::Instant::now(),
        label: None,
    };
    let producer = {
        let q = Arc::clone(&q);
        std::thread::spawn(move || {
            for i in 0..5 {
                q.push_wait(frame(i));
            }
            q.close();
        })
    };
    let got: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|f| f.index).collect();
    producer.join().unwrap();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert_eq!(q.dropped(), 0);
}
