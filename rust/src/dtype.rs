//! Element types of the safetensors format.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

const ALL: [(Dtype, &str, u32); 20] = [
    (Dtype::Bool, "BOOL", 8),
    (Dtype::F4, "F4", 4),
    (Dtype::F6E2M3, "F6_E2M3", 6),
    (Dtype::F6E3M2, "F6_E3M2", 6),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::F8E5M2, "F8_E5M2", 8),
    (Dtype::F8E4M3, "F8_E4M3", 8),
    (Dtype::F8E8M0, "F8_E8M0", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::C64, "C64", 64),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
];

impl Dtype {
    pub fn parse(name: &str) -> Option<Dtype> {
        ALL.iter().find(|(_, n, _)| *n == name).map(|(d, _, _)| *d)
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(d, _, _)| *d == self).map(|(_, n, _)| *n).unwrap()
    }

    pub fn bits(self) -> u32 {
        ALL.iter().find(|(d, _, _)| *d == self).map(|(_, _, b)| *b).unwrap()
    }

    /// Bytes per element, or `None` for the packed sub-byte types whose elements have no byte address.
    pub fn item_bytes(self) -> Option<u64> {
        let bits = self.bits();
        bits.is_multiple_of(8).then_some(u64::from(bits / 8))
    }

    /// Bytes taken by `numel` elements, or `None` when that is not a whole number of bytes or overflows.
    pub fn span_bytes(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(u64::from(self.bits()))?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The little-endian bytes of the element of this type nearest to `value` (ties to even), for
    /// the float types a plan can give values in; an error says why there is no such element.
    pub fn encode_float(self, value: f64) -> Result<Vec<u8>, String> {
        let (exponent_bits, mantissa_bits) = match self {
            Dtype::F64 => return Ok(value.to_le_bytes().to_vec()),
            Dtype::F32 => (8, 23),
            Dtype::BF16 => (8, 7),
            Dtype::F16 => (5, 10),
            other => return Err(format!("values can be given for F16, BF16, F32 and F64 tensors, not {other}")),
        };
        if !value.is_finite() {
            return Err(format!("value {value} is not a finite number"));
        }
        let bits =
            round_to_binary(value, exponent_bits, mantissa_bits).ok_or_else(|| format!("value {value} is out of range for {self}"))?;
        let bytes = bits.to_le_bytes();
        Ok(bytes[..(exponent_bits + mantissa_bits + 1) as usize / 8].to_vec())
    }
}

/// The bits of the IEEE binary float with `exponent_bits` and `mantissa_bits` nearest to the finite
/// `value` (ties to even, subnormals included), or `None` when it rounds past the largest finite one.
/// Rounding straight from f64 avoids the double rounding of going through f32 first.
fn round_to_binary(value: f64, exponent_bits: u32, mantissa_bits: u32) -> Option<u64> {
    let sign = u64::from(value.is_sign_negative()) << (exponent_bits + mantissa_bits);
    let magnitude = value.abs();
    if magnitude == 0.0 {
        return Some(sign);
    }
    let bias = (1i32 << (exponent_bits - 1)) - 1;
    let min_exponent = 1 - bias;
    // floor(log2(magnitude)) for normal f64 values; f64 subnormals land below any target's range.
    let exponent = ((magnitude.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let scale = exponent.max(min_exponent);
    // Multiplying by a power of two is exact, so `steps` is the magnitude in units of the target's
    // spacing at this exponent, rounded once.
    let steps = (magnitude * 2f64.powi(mantissa_bits as i32 - scale)).round_ties_even() as u64;
    // A carry out of the mantissa (steps == 2^(mantissa_bits + 1)) moves into the exponent by itself.
    let bits = (((scale - min_exponent) as u64) << mantissa_bits) + steps;
    let infinity = ((1u64 << exponent_bits) - 1) << mantissa_bits;
    (bits < infinity).then_some(sign | bits)
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (dtype, name, _) in ALL {
            assert_eq!(Dtype::parse(name), Some(dtype));
            assert_eq!(dtype.name(), name);
        }
        assert_eq!(Dtype::parse("F128"), None);
    }

    #[test]
    fn sub_byte_spans() {
        assert_eq!(Dtype::F4.span_bytes(4), Some(2));
        assert_eq!(Dtype::F4.span_bytes(3), None);
        assert_eq!(Dtype::F4.item_bytes(), None);
        assert_eq!(Dtype::BF16.span_bytes(3), Some(6));
        assert_eq!(Dtype::F64.span_bytes(u64::MAX), None);
    }

    fn f16(value: f64) -> Option<u16> {
        Dtype::F16.encode_float(value).ok().map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    #[test]
    fn half_precision_rounds_to_nearest_even_with_subnormals() {
        assert_eq!(f16(1.0), Some(0x3c00));
        assert_eq!(f16(-2.5), Some(0xc100));
        assert_eq!(f16(-0.0), Some(0x8000));
        assert_eq!(f16(65504.0), Some(0x7bff));
        assert_eq!(f16(65519.0), Some(0x7bff), "below the midpoint to 2^16");
        assert_eq!(f16(65520.0), None, "the midpoint rounds to even, which is infinity");
        assert_eq!(f16(2f64.powi(-24)), Some(0x0001), "smallest subnormal");
        assert_eq!(f16(2f64.powi(-25)), Some(0x0000), "halfway to the smallest subnormal rounds to even");
        assert_eq!(f16(3.0 * 2f64.powi(-25)), Some(0x0002));
        assert_eq!(f16(1.0 + 2f64.powi(-11)), Some(0x3c00), "tie between 1 and its successor");
        assert_eq!(f16(1.0 + 3.0 * 2f64.powi(-11)), Some(0x3c02));
        assert_eq!(f16(2f64.powi(-14) - 2f64.powi(-25)), Some(0x0400), "subnormal rounding up into the normals");
        assert!(Dtype::I32.encode_float(1.0).unwrap_err().contains("not I32"));
        assert!(Dtype::F32.encode_float(f64::NAN).is_err());
        assert!(Dtype::F32.encode_float(1e39).unwrap_err().contains("out of range for F32"));
        assert_eq!(Dtype::F64.encode_float(0.1).unwrap(), 0.1f64.to_le_bytes());
    }

    proptest::proptest! {
        #[test]
        fn single_precision_matches_the_hardware_cast(bits in proptest::num::u64::ANY) {
            let value = f64::from_bits(bits);
            let cast = value as f32;
            let encoded = Dtype::F32.encode_float(value);
            if value.is_finite() && cast.is_finite() {
                proptest::prop_assert_eq!(encoded.unwrap(), cast.to_le_bytes().to_vec());
            } else {
                proptest::prop_assert!(encoded.is_err());
            }
        }

        #[test]
        fn bfloat16_is_single_precision_rounded_to_its_top_half(bits in proptest::num::u32::ANY) {
            let value = f32::from_bits(bits);
            proptest::prop_assume!(value.is_finite());
            let wide = value.to_bits();
            let rounded = (u64::from(wide) + 0x7fff + u64::from((wide >> 16) & 1)) >> 16;
            let encoded = Dtype::BF16.encode_float(f64::from(value));
            if rounded & 0x7f80 == 0x7f80 {
                proptest::prop_assert!(encoded.is_err());
            } else {
                proptest::prop_assert_eq!(encoded.unwrap(), (rounded as u16).to_le_bytes().to_vec());
            }
        }
    }
}
