//! The embedding API on the shipped models: frames of any size and both pixel types, frame
//! numbering, fresh OS seeds and exact replay, a `Defense` on a worker thread, abstention.

mod common;

use diffshield::ndarray::{Array3, Array4};
use diffshield::{Defense, DefenseBuilder, Error, Image};

/// A short plan (T*=60, stride 20: 3 steps) keeps these tests fast; the protocol is the same.
fn builder() -> DefenseBuilder {
    Defense::builder().models(common::models_dir()).t_star(60).stride(20)
}

/// A w x h RGB8 frame of smooth colour ramps.
fn rgb8(w: u32, h: u32) -> Vec<u8> {
    (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x * 7 % 256) as u8, (y * 5 % 256) as u8, 128]))
        .collect()
}

#[test]
fn frames_of_any_size_and_type_are_numbered_in_order() {
    let mut d = builder().votes(2).build().unwrap();
    assert_eq!(d.input_size(), (32, 32));
    let a = d.classify(Image::rgb8(64, 48, &rgb8(64, 48))).unwrap();
    let chw =
        Array3::from_shape_fn((3, 20, 50), |(c, y, x)| ((c * 40 + y * 3 + x) % 256) as f32 / 255.0);
    let b = d.classify(Image::chw(chw.view())).unwrap();
    assert_eq!((a.frame, b.frame, d.next_frame()), (0, 1, 2));
    assert_eq!(a.vote_labels.len(), 2);
    assert!(a.label.is_some() && a.top_k.len() == 3 && a.top_k[0].prob >= a.top_k[1].prob);
    assert!((a.confidence.mean_prob - a.probs[a.label.unwrap()]).abs() < 1e-6);
    // Bad frames are refused, naming the problem; the frame counter does not move.
    let err = d.classify(Image::rgb8(10, 10, &[0; 17])).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let mut nan = chw.clone();
    nan[[1, 2, 3]] = f32::NAN;
    assert!(matches!(d.classify(Image::chw(nan.view())), Err(Error::Pixels { .. })));
    assert_eq!(d.next_frame(), 2);
    // A same-size f32 frame is used pixel for pixel: byte / 255 gives the RGB8 path's input.
    let bytes = rgb8(32, 32);
    let f = Array3::from_shape_fn((3, 32, 32), |(c, y, x)| {
        f32::from(bytes[(y * 32 + x) * 3 + c]) / 255.0
    });
    let mut one = builder().seed(5).build().unwrap();
    let mut two = builder().seed(5).build().unwrap();
    let from_bytes = one.classify(Image::rgb8(32, 32, &bytes)).unwrap();
    let from_f32 = two.classify(Image::chw(f.view())).unwrap();
    assert_eq!(from_bytes.probs, from_f32.probs);
}

#[test]
fn seeds_come_from_the_os_and_replay_exactly() {
    let frame = rgb8(40, 30);
    let mut a = builder().build().unwrap();
    let mut b = builder().build().unwrap();
    assert_ne!(a.seed(), b.seed(), "two defences drew the same seed");
    assert!(a.seed() < 1 << 53, "seeds stay exact in JSON doubles");
    let da: Vec<_> = (0..3).map(|_| a.classify(Image::rgb8(40, 30, &frame)).unwrap()).collect();
    let db = b.classify(Image::rgb8(40, 30, &frame)).unwrap();
    assert_ne!(da[0].probs, db.probs, "different seeds, different noise");
    assert!(da.iter().all(|d| d.seed == a.seed()));
    // The reported seed replays the run bit for bit, from the start or from any frame.
    let mut replay = builder().seed(da[0].seed).build().unwrap();
    for d in &da {
        assert_eq!(replay.classify(Image::rgb8(40, 30, &frame)).unwrap().probs, d.probs);
    }
    let mut from_two = builder().seed(da[0].seed).build().unwrap();
    from_two.set_next_frame(2);
    let d2 = from_two.classify(Image::rgb8(40, 30, &frame)).unwrap();
    assert_eq!((d2.frame, &d2.probs), (2, &da[2].probs));
}

#[test]
fn a_defense_moves_to_a_worker_thread() {
    let mut d = builder().seed(1).build().unwrap();
    let frame = rgb8(32, 32);
    let here = builder().seed(1).build().unwrap().classify(Image::rgb8(32, 32, &frame)).unwrap();
    let there = std::thread::spawn(move || d.classify(Image::rgb8(32, 32, &frame)).unwrap())
        .join()
        .unwrap();
    assert_eq!(here.probs, there.probs);
}

#[test]
fn below_the_threshold_the_defence_says_unknown() {
    let x = Array4::from_elem((2, 3, 32, 32), 0.5f32);
    let sure = builder().seed(2).build().unwrap().classify_images(x.view()).unwrap();
    let mut strict = builder().seed(2).min_confidence(1.0).build().unwrap();
    let unsure = strict.classify_images(x.view()).unwrap();
    for (s, u) in sure.iter().zip(&unsure) {
        assert!(s.label.is_some());
        assert_eq!((u.label, u.class.as_str()), (None, "unknown"));
        assert_eq!(u.probs, s.probs, "abstaining changes the answer, not the computation");
    }
    assert!(builder().min_confidence(1.5).build().is_err());
    assert!(builder().top_k(11).build().is_err(), "more classes than the classifier has");
}

/// The replay guarantee across batch sizes, stated in README ("Seeds and replay"): a frame's
/// noise never depends on its batch, and its probabilities agree to float rounding (tract's
/// plans for different batch sizes sum in different orders), so labels agree and
/// probabilities differ by at most 1e-5.
#[test]
fn batch_size_changes_probabilities_only_by_rounding() {
    let x = Array4::from_shape_fn((4, 3, 32, 32), |(n, c, y, x)| {
        ((n * 50 + c * 30 + y * 3 + x) % 256) as f32 / 255.0
    });
    let one = builder().seed(3).batch(1).build().unwrap().classify_images(x.view()).unwrap();
    let four = builder().seed(3).batch(4).build().unwrap().classify_images(x.view()).unwrap();
    for (a, b) in one.iter().zip(&four) {
        assert_eq!((a.frame, a.label), (b.frame, b.label));
        let worst = a.probs.iter().zip(&b.probs).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "frame {}: probabilities differ by {worst}", a.frame);
    }
}

#[test]
fn a_budget_is_calibrated_when_built() {
    let err = builder().budget_ms(0.01).build().err().expect("refused");
    assert!(err.to_string().contains("cannot fit even 1 DDIM step"), "{err}");
    let mut d = builder().budget_ms(60_000.0).build().unwrap();
    let x = d.classify(Image::rgb8(32, 32, &rgb8(32, 32))).unwrap();
    assert_eq!((x.planned_steps, x.deadline_met), (3, Some(true)));
}
