//! The activations, softmax and one-row attention products against f64 references, on lengths
//! with ragged tails, over the range the networks produce (and far beyond, where exp saturates).

use rand::{rngs::StdRng, Rng, SeedableRng};
use weft_kernels::{
    gelu_tanh, narrow_into, norm_rows, scaled_dots, silu_mul, silu_mul_halves, softmax_rows, weighted_sums,
    weighted_sums_add, widen_into, CachedValue, Norm,
};

fn values(n: usize, spread: f32, rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-spread..spread)).collect();
    v.extend([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 1e4, -1e4]);
    v
}

/// Within `rel` of the f64 value (a few f32 ulps: the argument of exp is itself rounded).
fn close(got: f32, want: f64, rel: f64, what: &str) {
    let err = (got as f64 - want).abs();
    assert!(err <= rel * want.abs() + 1e-30, "{what}: {got} vs {want} (error {err:e})");
}

#[test]
fn silu_times_up_matches_f64() {
    let mut rng = StdRng::seed_from_u64(1);
    for n in [1, 7, 8, 9, 100, 20_000] {
        let gate = values(n, 20.0, &mut rng);
        let up = values(n, 3.0, &mut rng);
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        for i in 0..got.len() {
            let g = gate[i] as f64;
            close(got[i], g / (1.0 + (-g).exp()) * up[i] as f64, 1e-6, &format!("silu({g}) * {}", up[i]));
        }
    }
}

#[test]
fn gelu_tanh_matches_f64() {
    let mut rng = StdRng::seed_from_u64(2);
    for n in [3, 8, 33, 20_000] {
        let x = values(n, 12.0, &mut rng);
        let mut got = x.clone();
        gelu_tanh(&mut got);
        for (i, &v) in x.iter().enumerate() {
            let v = v as f64;
            // 0.5 v (1 + tanh(u)) written without the cancellation of 1 + tanh(u) for large
            // negative v, which f64 suffers too (it rounds -1.8e-17 at v = -7.4 to 0).
            let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
            // The f32 argument of exp carries 1 ulp of 2u, which exp turns into relative error.
            let rel = 1e-6 + 2.4e-7 * (2.0 * u).abs();
            close(got[i], v / (1.0 + (-2.0 * u).exp()), rel, &format!("gelu({v})"));
        }
    }
}

#[test]
fn softmax_rows_match_f64_and_masked_entries_are_zero() {
    let mut rng = StdRng::seed_from_u64(3);
    for row_len in [1, 5, 8, 13, 729] {
        let rows = 7;
        let mut x: Vec<f32> = (0..rows * row_len).map(|_| rng.random_range(-30.0..30.0)).collect();
        if row_len > 1 {
            x[row_len - 1] = f32::NEG_INFINITY; // a causal mask
        }
        let input = x.clone();
        softmax_rows(&mut x, row_len);
        for (got, row) in x.chunks(row_len).zip(input.chunks(row_len)) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (g, &v) in got.iter().zip(row) {
                let want = (v as f64 - max).exp() / total;
                let err = (*g as f64 - want).abs();
                assert!(err <= 1e-6 * want + 1e-12, "softmax {v}: {g} vs {want}");
            }
        }
        if row_len > 1 {
            assert_eq!(x[row_len - 1], 0.0, "a masked score gets exactly nothing");
        }
    }
}

/// In f32, bf16 and f16 (a KV cache in bf16 or f16), for 1 to 7 queries sharing the rows (the AVX-512
/// tiles take 4 heads and 4 rows at a time, and 64 values for the sums): each row is widened
/// exactly, so the reference multiplies the widened values.
#[test]
fn grouped_dots_and_weighted_sums_match_f64() {
    let mut rng = StdRng::seed_from_u64(4);
    for (group, rows, d) in [(1, 1, 1), (2, 3, 7), (1, 5, 16), (7, 129, 64), (3, 40, 80), (1, 2, 131), (5, 6, 128)] {
        let queries: Vec<f32> = (0..group * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let keys: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        check_rows(&queries, d, &keys, rows);
        check_rows(&queries, d, &keys.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(), rows);
        check_rows(&queries, d, &keys.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>(), rows);
    }
}

fn check_rows<T: CachedValue>(queries: &[f32], d: usize, keys: &[T], rows: usize) {
    let group = queries.len() / d;
    let key = |i: usize, p: usize| keys[i * d + p].to_f32();
    let mut scores = vec![f32::NAN; group * rows];
    scaled_dots(queries, d, keys, 0.125, &mut scores);
    for (at, &s) in scores.iter().enumerate() {
        let (g, i) = (at / rows, at % rows);
        let query = &queries[g * d..];
        let want: f64 = 0.125 * (0..d).map(|p| key(i, p) as f64 * query[p] as f64).sum::<f64>();
        let scale: f64 = (0..d).map(|p| (key(i, p) * query[p]).abs() as f64).sum();
        assert!((s as f64 - want).abs() <= 1e-6 * scale + 1e-7, "{group}x{rows}x{d} dot {g} {i}: {s} vs {want}");
    }
    let mut out = vec![f32::NAN; group * d];
    weighted_sums(&scores, keys, d, &mut out);
    for (at, &o) in out.iter().enumerate() {
        let (g, p) = (at / d, at % d);
        let weights = &scores[g * rows..];
        let want: f64 = (0..rows).map(|i| weights[i] as f64 * key(i, p) as f64).sum();
        let scale: f64 = (0..rows).map(|i| (weights[i] * key(i, p)).abs() as f64).sum();
        assert!((o as f64 - want).abs() <= 1e-6 * scale + 1e-7, "{group}x{rows}x{d} sum {g} {p}: {o} vs {want}");
    }
}

/// Rows stored into an f16 cache and read back: the same bits as `half`'s conversions (ties
/// to even, subnormals kept), except that values past f16's range saturate and NaN stays NaN;
/// bf16 and f32 as their own conversions.
#[test]
fn rows_narrow_and_widen_like_half() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut values: Vec<f32> = (0..1000).map(|_| rng.random_range(-70000.0f32..70000.0)).collect();
    values.extend((0..1000).map(|_| rng.random_range(-1.0f32..1.0) * 1e-5));
    values.extend([
        0.0,
        -0.0,
        65504.0,
        65520.0,
        -1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        6e-8,
        3e-8,
        1.0 + 1.0 / 2048.0,
    ]);
    let mut halves = vec![half::f16::ZERO; values.len()];
    narrow_into(&values, &mut halves);
    for (&v, h) in values.iter().zip(&halves) {
        let want = half::f16::from_f32(v.clamp(-65504.0, 65504.0));
        assert_eq!(h.to_bits(), want.to_bits(), "{v}");
    }
    let mut nan = [half::f16::ZERO; 9];
    narrow_into(&[f32::NAN; 9], &mut nan);
    assert!(nan.iter().all(|h| h.is_nan()));
    let mut back = vec![0.0f32; halves.len()];
    widen_into(&halves, &mut back);
    assert!(back.iter().zip(&halves).all(|(b, h)| b.to_bits() == h.to_f32().to_bits()));
    let mut brains = vec![half::bf16::ZERO; values.len()];
    narrow_into(&values, &mut brains);
    assert!(brains.iter().zip(&values).all(|(b, &v)| b.to_bits() == half::bf16::from_f32(v).to_bits()));
}

/// A KV cache in blocks: the weighted sums taken block by block (16 rows each, the last one
/// partial) and added up are the same bits as one sum over all the rows, in f32, bf16 and f16.
#[test]
fn weighted_sums_over_blocks_equal_one_sum() {
    let mut rng = StdRng::seed_from_u64(5);
    for (group, rows, d) in [(1, 1, 8), (2, 17, 64), (7, 129, 64), (3, 40, 80), (5, 33, 128)] {
        let weights: Vec<f32> = (0..group * rows).map(|_| rng.random_range(0.0..1.0)).collect();
        let values: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        assert_blocks_match(&weights, &values, group, rows, d);
        assert_blocks_match(
            &weights,
            &values.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(),
            group,
            rows,
            d,
        );
        assert_blocks_match(
            &weights,
            &values.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>(),
            group,
            rows,
            d,
        );
    }
}

fn assert_blocks_match<T: CachedValue>(weights: &[f32], values: &[T], group: usize, rows: usize, d: usize) {
    let mut whole = vec![f32::NAN; group * d];
    weighted_sums(weights, values, d, &mut whole);
    let mut pieces = vec![0.0f32; group * d];
    for first in (0..rows).step_by(16) {
        let n = 16.min(rows - first);
        let part: Vec<f32> = (0..group).flat_map(|g| weights[g * rows + first..][..n].iter().copied()).collect();
        weighted_sums_add(&part, &values[first * d..(first + n) * d], d, &mut pieces);
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&whole), bits(&pieces), "{group}x{rows}x{d}");
}

#[test]
fn rms_norm_rows_match_f64() {
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, d) in [(1, 1), (3, 7), (700, 64), (2, 1024)] {
        let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-40.0..40.0)).collect();
        let weight: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut out = vec![f32::NAN; rows * d];
        norm_rows(&x, &Norm::Rms { weight: &weight, eps: 1e-6 }, &mut out);
        for (o, row) in out.chunks(d).zip(x.chunks(d)) {
            let mean: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inverse = 1.0 / (mean + 1e-6).sqrt();
            for ((&got, &v), &w) in o.iter().zip(row).zip(&weight) {
                close(got, v as f64 * inverse * w as f64, 1e-6, &format!("rms_norm {v} x {w}"));
            }
        }
    }
}

#[test]
fn layer_norm_rows_match_f64() {
    let mut rng = StdRng::seed_from_u64(7);
    for (rows, d) in [(1, 1), (3, 7), (729, 72), (2, 1152)] {
        let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-40.0..40.0) + 100.0).collect();
        let weight: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bias: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![f32::NAN; rows * d];
        norm_rows(&x, &Norm::Layer { weight: &weight, bias: &bias, eps: 1e-6 }, &mut out);
        for (o, row) in out.chunks(d).zip(x.chunks(d)) {
            let mean: f64 = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let variance: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inverse = 1.0 / (variance + 1e-6).sqrt();
            for (((&got, &v), &w), &b) in o.iter().zip(row).zip(&weight).zip(&bias) {
                let want = (v as f64 - mean) * inverse * w as f64 + b as f64;
                assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "layer_norm {v}: {got} vs {want}");
            }
        }
    }
}

/// The fused gate/up rows give, bit for bit, what copying each gate and multiplying in place
/// gives.
#[test]
fn silu_of_halves_equals_silu_of_each_row() {
    let mut rng = StdRng::seed_from_u64(8);
    for (rows, width) in [(1, 1), (3, 37), (300, 64), (5, 2816)] {
        let fused: Vec<f32> = (0..rows * 2 * width).map(|_| rng.random_range(-8.0..8.0)).collect();
        let mut want = Vec::new();
        for row in fused.chunks(2 * width) {
            let mut gate = row[..width].to_vec();
            silu_mul(&mut gate, &row[width..]);
            want.extend(gate);
        }
        let got = silu_mul_halves(&fused, width);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{rows} rows of {width}");
    }
}
