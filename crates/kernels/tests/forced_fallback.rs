//! `WEFT_KERNELS=scalar` forces the portable path (its own test binary, so the choice is fresh).

use weft_kernels::{gelu_tanh, matmul, silu_mul, softmax_rows, Isa, PackedWeight, WeightFormat};

#[test]
fn the_environment_forces_the_scalar_path() {
    std::env::set_var("WEFT_KERNELS", "scalar");
    assert_eq!(Isa::active(), Isa::Scalar);
    let packed = PackedWeight::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, WeightFormat::Bf16);
    let mut y = vec![0.0; 2];
    matmul(&[1.0, 1.0, 1.0], 1, &packed, Some(&[0.5, -0.5]), &mut y);
    assert_eq!(y, vec![6.5, 14.5]);
    // The activations take their scalar loops too (9 values: past one AVX2 register).
    let mut gate = vec![1.0f32; 9];
    silu_mul(&mut gate, &[2.0; 9]);
    assert!(gate.iter().all(|&g| (g - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6), "{gate:?}");
    let mut x = vec![0.0f32; 9];
    gelu_tanh(&mut x);
    assert_eq!(x, vec![0.0; 9]);
    let mut row = vec![0.0f32, f32::NEG_INFINITY];
    softmax_rows(&mut row, 2);
    assert_eq!(row, vec![1.0, 0.0]);
}
