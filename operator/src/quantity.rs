//! Kubernetes resource quantities (`1Gi`, `500Mi`, `1.5G`, `1e9`) read as
//! numbers, so two spellings of one size compare equal (`1.5Gi` is what a
//! user writes, `1536Mi` what the API server stores).

/// The value of `quantity` in thousandths of its unit, the precision
/// Kubernetes keeps (finer values round up, as the API server rounds
/// `0.1m` to `1m`). `None` when the text is not a quantity, or its value
/// does not fit.
///
/// Grammar (from the API's `Quantity` type): an optionally signed decimal
/// number (`5`, `5.`, `.5`, `5.25`) followed by nothing, a decimal SI
/// suffix (`m k M G T P E`), a binary SI suffix (`Ki Mi Gi Ti Pi Ei`) or a
/// decimal exponent (`e3`, `E-2`).
pub fn parse_millis(quantity: &str) -> Option<i128> {
    let (negative, rest) = match quantity.as_bytes().first()? {
        b'+' => (false, &quantity[1..]),
        b'-' => (true, &quantity[1..]),
        _ => (false, quantity),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    // Too many digits for an i128 either way; Kubernetes caps at 2^63-1.
    if int.len() + frac.len() > 30 {
        return None;
    }
    let mut mantissa: i128 = 0;
    for digit in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(i128::from(digit - b'0'))?;
    }
    let (decimal_exp, binary_exp): (i32, u32) = match suffix {
        "" => (0, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (exp.parse().ok()?, 0)
        }
    };
    // value = mantissa * 10^(decimal_exp - frac digits) * 2^binary_exp,
    // counted in thousandths.
    let frac_len = i32::try_from(frac.len()).ok()?;
    let scaled = mantissa.checked_mul(1i128.checked_shl(binary_exp)?)?;
    let exp10 = decimal_exp.checked_add(3)?.checked_sub(frac_len)?;
    let millis = if exp10 >= 0 {
        scaled.checked_mul(10i128.checked_pow(exp10.unsigned_abs())?)?
    } else {
        match 10i128.checked_pow(exp10.unsigned_abs()) {
            // Round up, as Kubernetes does.
            Some(divisor) => scaled.checked_add(divisor - 1)? / divisor,
            // Smaller than any representable step: rounds up to one, or
            // stays zero.
            None => i128::from(scaled > 0),
        }
    };
    Some(if negative { -millis } else { millis })
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn suffixes_scale_the_number() {
        assert_eq!(parse_millis("1"), Some(1_000));
        assert_eq!(parse_millis("1m"), Some(1));
        assert_eq!(parse_millis("2k"), Some(2_000_000));
        assert_eq!(parse_millis("1G"), Some(1_000_000_000_000));
        assert_eq!(parse_millis("1Ki"), Some(1_024_000));
        assert_eq!(parse_millis("1Gi"), Some(1_073_741_824_000));
        assert_eq!(parse_millis("1Ei"), Some(1_152_921_504_606_846_976_000));
        assert_eq!(parse_millis("1e3"), parse_millis("1k"));
        assert_eq!(parse_millis("1E-3"), Some(1));
        assert_eq!(parse_millis("+5"), Some(5_000));
        assert_eq!(parse_millis("-5"), Some(-5_000));
        assert_eq!(parse_millis("0"), Some(0));
    }

    #[test]
    fn spellings_of_one_value_are_equal() {
        assert_eq!(parse_millis("1.5Gi"), parse_millis("1536Mi"));
        assert_eq!(parse_millis("1Gi"), parse_millis("1024Mi"));
        assert_eq!(parse_millis("0.5"), parse_millis("500m"));
        assert_eq!(parse_millis(".5"), parse_millis("0.5"));
        assert_eq!(parse_millis("5."), parse_millis("5"));
        assert_eq!(parse_millis("1000M"), parse_millis("1G"));
        assert_ne!(parse_millis("1G"), parse_millis("1Gi"));
    }

    #[test]
    fn finer_than_a_thousandth_rounds_up() {
        assert_eq!(parse_millis("0.1m"), Some(1));
        assert_eq!(parse_millis("1e-30"), Some(1));
        assert_eq!(parse_millis("0e-30"), Some(0));
    }

    #[test]
    fn malformed_text_is_not_a_quantity() {
        for bad in [
            "", "+", "Gi", ".", "1..5", "1.5.5", "1 Gi", "1gi", "1Xi", "1e", "1e+", "1e1.5",
            "1Gib", "ten",
        ] {
            assert_eq!(parse_millis(bad), None, "{bad:?}");
        }
        // Too large for the arithmetic.
        assert_eq!(parse_millis("1e40"), None);
        assert_eq!(parse_millis(&"9".repeat(31)), None);
    }
}
