//! Every kernel path against a naive f64 product, on awkward shapes: one row, odd inner sizes,
//! sizes that are not multiples of the vector width or the tile, row counts that end in a
//! narrow panel of the AVX-512 BF16 GEMM (1-16 rows past whole panels of 32) and that do not.

use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use weft_kernels::{
    gelu_tanh, matmul, matmul_new, matmul_new_adding, matmul_new_normed, matmul_new_then, matmul_using, norm_rows_new,
    Activation, Isa, Kernel, Norm, PackedWeight, WeightFormat,
};

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 5),
    (2, 16, 3),
    (3, 33, 13),
    (4, 64, 12),
    (5, 100, 29),
    (1, 896, 1000),
    (16, 96, 40),
    (17, 896, 37),
    (1, 4864, 50),
    (9, 65, 127),
    (33, 1152, 70),
    (40, 600, 13),
    (48, 64, 25),
    (64, 520, 97),
];

/// Both loop nests on every shape (the automatic choice only reaches each on some of them).
const KERNELS: [Kernel; 3] = [Kernel::Auto, Kernel::Tiles, Kernel::Gemm];

fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Each row's activations quantized per block of 32 as the AVX-512 VNNI kernel does (scale
/// `amax / 127`, multiplied by its inverse, rounded to nearest even) and turned back to values.
fn quantized_per_block(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(k.max(1)) {
        for block in row.chunks(32) {
            let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            out.extend(block.iter().map(|&v| (v * inverse).round_ties_even() as f64 * scale as f64).map(|v| v as f32));
        }
    }
    out
}

/// `y = x W^T + b` in f64, with the weights as the kernels hold them (rounded or quantized) and,
/// on AVX-512, the activations as its kernels take them: rounded to bf16 for bf16 weights,
/// quantized per block for 8-bit ones. Also returns `sum |x| |w|` per output, the scale of the
/// rounding error.
fn reference(x: &[f32], packed: &PackedWeight, b: &[f32], m: usize, isa: Isa) -> (Vec<f64>, Vec<f64>) {
    let (n, k, format) = (packed.rows(), packed.cols(), packed.format());
    let round = |v: f32| bf16::from_f32(v).to_f32();
    let w: Vec<f32> = (0..n * k).map(|i| packed.get(i / k, i % k)).collect();
    let x: Vec<f32> = match (format, isa) {
        (WeightFormat::Bf16, Isa::Avx512Bf16 | Isa::Amx) => x.iter().map(|&v| round(v)).collect(),
        (WeightFormat::Q8, Isa::Avx512Bf16 | Isa::Amx) => quantized_per_block(x, k),
        _ => x.to_vec(),
    };
    let mut y = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (b[j] as f64, 0.0);
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p] as f64;
                a += (x[i * k + p] as f64 * w[j * k + p] as f64).abs();
            }
            y[i * n + j] = s;
            scale[i * n + j] = a;
        }
    }
    (y, scale)
}

#[test]
fn every_path_matches_the_naive_product() {
    let mut rng = StdRng::seed_from_u64(7);
    let isas = Isa::available();
    println!("paths on this CPU: {:?}", isas.iter().map(|i| i.name()).collect::<Vec<_>>());
    assert!(isas.contains(&Isa::Scalar));
    for &(m, k, n) in SHAPES {
        let x = random(m * k, &mut rng);
        let w = random(n * k, &mut rng);
        let b = random(n, &mut rng);
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            for (&isa, kernel) in isas.iter().flat_map(|i| KERNELS.iter().map(move |&k| (i, k))) {
                let packed = PackedWeight::from_f32_for(isa, &w, n, k, format);
                assert_eq!((packed.rows(), packed.cols(), packed.format()), (n, k, format));
                let (want, scale) = reference(&x, &packed, &b, m, isa);
                let mut got = vec![f32::NAN; m * n];
                matmul_using(isa, kernel, &x, m, &packed, Some(&b), &mut got);
                for idx in 0..m * n {
                    // f32 accumulation error grows with k; bias and rounding are already in `want`.
                    let tol = 1e-5 * scale[idx] + 1e-6 + 2e-7 * k as f64 * scale[idx];
                    let err = (got[idx] as f64 - want[idx]).abs();
                    assert!(
                        err <= tol,
                        "{m}x{k}x{n} {format:?} on {} {kernel:?}: [{idx}] {} vs {} (tol {tol})",
                        isa.name(),
                        got[idx],
                        want[idx]
                    );
                }
            }
        }
    }
}

/// A residual added in the product equals the product plus the residual, in every format, on
/// the CPU's own kernels (on AMX from the row order's shapes down to one row).
#[test]
fn the_residual_in_the_product_is_the_product_plus_the_residual() {
    let mut rng = StdRng::seed_from_u64(13);
    for &(m, k, n) in SHAPES.iter().chain(&[(300, 1152, 200), (745, 256, 96)]) {
        let (x, w, b, r) =
            (random(m * k, &mut rng), random(n * k, &mut rng), random(n, &mut rng), random(m * n, &mut rng));
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let (_, scale) = reference(&x, &packed, &b, m, Isa::active());
            let want: Vec<f32> = matmul_new(&x, m, &packed, Some(&b)).iter().zip(&r).map(|(y, r)| y + r).collect();
            let got = matmul_new_adding(&x, m, &packed, Some(&b), &r);
            for idx in 0..m * n {
                let tol = 1e-6 * (scale[idx] + 1.0) + 1e-7 * k as f64 * scale[idx];
                let err = (got[idx] - want[idx]).abs() as f64;
                assert!(err <= tol, "{m}x{k}x{n} {format:?}: [{idx}] {} vs {} (tol {tol})", got[idx], want[idx]);
            }
        }
    }
}

/// A norm on the way into the product (on AMX tiles, as the rows are rounded into its panels)
/// gives the bits of the norm's rows multiplied, for every weight format.
#[test]
fn a_norm_on_the_way_in_is_the_normalised_rows_multiplied() {
    let mut rng = StdRng::seed_from_u64(17);
    for &(m, k, n) in SHAPES.iter().chain(&[(300, 1152, 200), (745, 256, 96)]) {
        let (x, w, b) = (random(m * k, &mut rng), random(n * k, &mut rng), random(n, &mut rng));
        let (weight, bias) = (random(k, &mut rng), random(k, &mut rng));
        let norms = [Norm::Layer { weight: &weight, bias: &bias, eps: 1e-6 }, Norm::Rms { weight: &weight, eps: 1e-6 }];
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            for norm in &norms {
                let want = matmul_new(&norm_rows_new(&x, norm), m, &packed, Some(&b));
                let got = matmul_new_normed(&x, m, norm, &packed, Some(&b));
                let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{m}x{k}x{n} {format:?} {norm:?}");
            }
        }
    }
}

/// 8-bit weights on AVX-512 VNNI: every row's outputs are bit-identical whether it is multiplied
/// alone or with 1 to 40 other rows (decode alone, batched decode, prefill), so a sequence's
/// tokens do not depend on what else is running. On AMX, 16 rows and more take the AMX-INT8
/// tiles and fewer the VNNI loop nest, with the same bits.
#[test]
fn q8_rows_do_not_depend_on_the_batch() {
    if !Isa::available().contains(&Isa::Avx512Bf16) {
        eprintln!("no AVX-512 VNNI here: skipped");
        return;
    }
    rows_do_not_depend_on_the_batch(Isa::Avx512Bf16, WeightFormat::Q8, 1100);
    if Isa::available().contains(&Isa::Amx) {
        rows_do_not_depend_on_the_batch(Isa::Amx, WeightFormat::Q8, 1100);
    }
}

/// The same for bf16 weights on AMX tiles: one loop nest at every row count, 16-row and 32-row
/// tiles, outputs stored straight or through the block's buffer, all the same sums.
#[test]
fn bf16_rows_on_amx_do_not_depend_on_the_batch() {
    if !Isa::available().contains(&Isa::Amx) {
        eprintln!("no AMX here: skipped");
        return;
    }
    rows_do_not_depend_on_the_batch(Isa::Amx, WeightFormat::Bf16, 1100);
    // Long inputs run in chunks, their sums kept between chunks.
    rows_do_not_depend_on_the_batch(Isa::Amx, WeightFormat::Bf16, 8300);
}

/// bf16 weights on the AVX-512 BF16 GEMM: a row gets the same bits in a full panel of 32 rows
/// and in a narrow one of 16 (each lane sums the same pairs in the same order in both tiles).
#[test]
fn bf16_gemm_rows_are_the_same_bits_in_full_and_narrow_panels() {
    if !Isa::available().contains(&Isa::Avx512Bf16) {
        eprintln!("no AVX-512 BF16 here: skipped");
        return;
    }
    let mut rng = StdRng::seed_from_u64(19);
    let (k, n) = (1100, 83);
    let packed = PackedWeight::from_f32_for(Isa::Avx512Bf16, &random(n * k, &mut rng), n, k, WeightFormat::Bf16);
    let b = random(n, &mut rng);
    let x = random(48 * k, &mut rng);
    let product = |m: usize| {
        let mut y = vec![0.0; m * n];
        matmul_using(Isa::Avx512Bf16, Kernel::Gemm, &x[..m * k], m, &packed, Some(&b), &mut y);
        y
    };
    // 48 rows: rows 0-31 in a full panel, 32-47 in a narrow one; 16 rows: one narrow panel.
    let (narrow, full) = (product(16), product(48));
    assert!(narrow.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()), "rows 0-15 differ");
}

fn rows_do_not_depend_on_the_batch(isa: Isa, format: WeightFormat, k: usize) {
    let mut rng = StdRng::seed_from_u64(11);
    let n = 83;
    let packed = PackedWeight::from_f32_for(isa, &random(n * k, &mut rng), n, k, format);
    let b = random(n, &mut rng);
    let x = random(41 * k, &mut rng);
    let alone: Vec<Vec<f32>> = x
        .chunks_exact(k)
        .map(|row| {
            let mut y = vec![0.0; n];
            matmul_using(isa, Kernel::Auto, row, 1, &packed, Some(&b), &mut y);
            y
        })
        .collect();
    for m in [2, 3, 5, 16, 41] {
        let mut y = vec![0.0; m * n];
        matmul_using(isa, Kernel::Auto, &x[..m * k], m, &packed, Some(&b), &mut y);
        for (i, row) in y.chunks_exact(n).enumerate() {
            let same = row.iter().zip(&alone[i]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {i} of {m} differs from the row alone");
        }
    }
}

/// A weight packed for AVX-512's 8-bit panels, multiplied on a lower set, is still right.
#[test]
fn q8_panels_on_a_lower_set_fall_back_correctly() {
    if !Isa::available().contains(&Isa::Avx512Bf16) {
        return;
    }
    let mut rng = StdRng::seed_from_u64(5);
    let (m, k, n) = (3, 70, 21);
    let (x, b) = (random(m * k, &mut rng), random(n, &mut rng));
    let packed = PackedWeight::from_f32_for(Isa::Avx512Bf16, &random(n * k, &mut rng), n, k, WeightFormat::Q8);
    let (want, scale) = reference(&x, &packed, &b, m, Isa::Avx2);
    let mut got = vec![0.0; m * n];
    matmul_using(Isa::Avx2, Kernel::Auto, &x, m, &packed, Some(&b), &mut got);
    for i in 0..m * n {
        assert!((got[i] as f64 - want[i]).abs() <= 1e-5 * scale[i] + 1e-6, "[{i}] {} vs {}", got[i], want[i]);
    }
}

#[test]
fn bf16_bits_load_unrounded_and_no_bias_means_zero() {
    let bits: Vec<u16> = [1.5f32, -2.0, 0.25, 3.0, 0.5, -1.0].iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let packed = PackedWeight::from_bf16_bits(&bits, 2, 3);
    for isa in Isa::available() {
        let mut y = vec![0.0; 2];
        matmul_using(isa, Kernel::Auto, &[1.0, 2.0, 4.0], 1, &packed, None, &mut y);
        assert_eq!(y, vec![1.5 - 4.0 + 1.0, 3.0 + 1.0 - 4.0], "{}", isa.name());
    }
}

#[test]
fn q8_blocks_keep_each_weight_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(3);
    // 16 rows: one whole panel in the layout for AVX-512, so both layouts hold 9 bits a weight.
    let (n, k) = (16, 70);
    let w = random(n * k, &mut rng);
    for isa in Isa::available() {
        let packed = PackedWeight::from_f32_for(isa, &w, n, k, WeightFormat::Q8);
        assert_eq!(packed.bytes(), n * 96 * 9 / 8, "{}", isa.name());
        check_within_half_a_step(&packed, &w);
    }
}

fn check_within_half_a_step(packed: &PackedWeight, w: &[f32]) {
    let (n, k) = (packed.rows(), packed.cols());
    for row in 0..n {
        for block in (0..k).step_by(32) {
            let cols = block..(block + 32).min(k);
            let amax = cols.clone().map(|c| w[row * k + c].abs()).fold(0.0f32, f32::max);
            for c in cols {
                let err = (packed.get(row, c) - w[row * k + c]).abs();
                assert!(err <= amax / 254.0 * 1.0001, "({row}, {c}): {err} vs step {}", amax / 127.0);
            }
        }
    }
}

/// The product into a new, never-zeroed vector is the product into a given slice, bit for bit.
#[test]
fn a_new_output_equals_a_given_one() {
    let mut rng = StdRng::seed_from_u64(11);
    for &(m, k, n) in SHAPES {
        let (x, w, b) = (random(m * k, &mut rng), random(n * k, &mut rng), random(n, &mut rng));
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let mut given = vec![0.0; m * n];
            matmul(&x, m, &packed, Some(&b), &mut given);
            let new = matmul_new(&x, m, &packed, Some(&b));
            assert_eq!(
                new.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                given.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

/// The activation applied in a product's epilogue (inside the AMX loop nest; after the product
/// elsewhere) gives the same bits as the same function applied to the product's output.
#[test]
fn an_activation_in_the_epilogue_equals_one_after() {
    let mut rng = StdRng::seed_from_u64(12);
    for &(m, k, n) in SHAPES {
        let (x, w, b) = (random(m * k, &mut rng), random(n * k, &mut rng), random(n, &mut rng));
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let mut after = matmul_new(&x, m, &packed, Some(&b));
            gelu_tanh(&mut after);
            let fused = matmul_new_then(&x, m, &packed, Some(&b), Activation::GeluTanh);
            assert_eq!(
                fused.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                after.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{m}x{k}x{n} {format:?}"
            );
        }
    }
}

#[test]
fn empty_inputs_are_fine() {
    let packed = PackedWeight::from_f32(&[1.0; 6], 2, 3, WeightFormat::F32);
    let mut y: Vec<f32> = vec![];
    matmul_using(Isa::Scalar, Kernel::Auto, &[], 0, &packed, None, &mut y);
    assert!(y.is_empty());
}
