//! `WEFT_KERNELS=scalar` forces the portable path (its own test binary, so the choice is fresh).

use weft_kernels::{matmul, Isa, PackedWeight, WeightFormat};

#[test]
fn the_environment_forces_the_scalar_path() {
    std::env::set_var("WEFT_KERNELS", "scalar");
    assert_eq!(Isa::active(), Isa::Scalar);
    let packed = PackedWeight::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, WeightFormat::Bf16);
    let mut y = vec![0.0; 2];
    matmul(&[1.0, 1.0, 1.0], 1, &packed, Some(&[0.5, -0.5]), &mut y);
    assert_eq!(y, vec![6.5, 14.5]);
}
