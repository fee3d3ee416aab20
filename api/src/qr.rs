//! QR code images of a payload's bytes, as PNG or SVG, for business systems to show.
//!
//! Owns the picture, not the content: callers pass the bytes (a
//! [`QrPayload`](countersign_protocol::qr::QrPayload) encoding) and get an image back. Rules:
//! - the bytes go in one byte-mode segment at error-correction level M, in the smallest QR
//!   version that holds them. The encoder's optimal segmentation is not used, so the capacity
//!   is a fixed [`MAX_DATA_LEN`] bytes whatever the content, and readers see exactly the
//!   bytes given, in the one mode every reader supports;
//! - the image is square, black on white, with the standard 4-module quiet zone; each module is
//!   `max(1, size / (modules + 8))` pixels, so the image is at most `size` pixels across unless
//!   even one pixel per module would not fit;
//! - `size` must lie in [`MIN_SIZE`]`..=`[`MAX_SIZE`], which bounds the memory one request can
//!   make us spend (about 4 MiB of pixels at most).

use std::iter;

use qrcode::bits::Bits;
use qrcode::render::svg;
use qrcode::types::QrError;
use qrcode::{EcLevel, QrCode, Version};

/// The smallest image size accepted, in pixels.
pub const MIN_SIZE: u32 = 64;
/// The largest image size accepted, in pixels.
pub const MAX_SIZE: u32 = 2048;
/// The most bytes a QR code holds in byte mode at level M (version 40).
pub const MAX_DATA_LEN: usize = 2331;
/// Light modules around the code on every side, as the QR standard asks.
const QUIET_ZONE: usize = 4;
const EC_LEVEL: EcLevel = EcLevel::M;
const DARK: u8 = 0;
const LIGHT: u8 = 255;

/// Why an image could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QrImageError {
    /// The caller's mistake (422): more bytes than a QR code holds at level M.
    #[error("data too large for a QR code: at most {MAX_DATA_LEN} bytes")]
    TooLarge,
    /// The caller's mistake (400): an image size out of range.
    #[error("QR image size {size} is out of range: must be {MIN_SIZE} to {MAX_SIZE} pixels")]
    InvalidSize {
        /// The size asked for.
        size: u32,
    },
    /// Internal (500, log the detail): the QR or PNG encoder failed on valid input, which
    /// should not happen. The message shown says nothing more.
    #[error("QR image could not be rendered")]
    Internal(String),
}

/// Renders `data` (binary bytes) as a QR code (byte mode, error-correction level M) into a PNG
/// image of about `size` pixels square (size 64..=2048; module size = max(1, size / (modules+8)),
/// 4-module quiet zone), 8-bit grayscale, black on white.
///
/// # Errors
/// [`QrImageError::InvalidSize`] for a size out of range, [`QrImageError::TooLarge`] for more
/// than [`MAX_DATA_LEN`] bytes.
pub fn png(data: &[u8], size: u32) -> Result<Vec<u8>, QrImageError> {
    let code = qr_code(data, size)?;
    let modules = code.width();
    let module_px = module_px(modules, size);
    let side = (modules + 2 * QUIET_ZONE) * module_px;
    let quiet_px = QUIET_ZONE * module_px;

    let mut pixels = Vec::with_capacity(side * side);
    let light_line = vec![LIGHT; side];
    let quiet_lines = |pixels: &mut Vec<u8>| {
        for _ in 0..quiet_px {
            pixels.extend_from_slice(&light_line);
        }
    };
    quiet_lines(&mut pixels);
    let mut line = Vec::with_capacity(side);
    // `width()` is at least 21, so `max(1)` only keeps `chunks` from ever seeing zero.
    for row in code.to_colors().chunks(modules.max(1)) {
        line.clear();
        line.resize(quiet_px, LIGHT);
        for color in row {
            line.extend(iter::repeat_n(color.select(DARK, LIGHT), module_px));
        }
        line.resize(side, LIGHT);
        for _ in 0..module_px {
            pixels.extend_from_slice(&line);
        }
    }
    quiet_lines(&mut pixels);

    let side = u32::try_from(side).map_err(|e| QrImageError::Internal(e.to_string()))?;
    encode_png(&pixels, side).map_err(|e| QrImageError::Internal(e.to_string()))
}

/// Same as [`png`], as an SVG document (qrcode's SVG renderer, with the quiet zone).
///
/// # Errors
/// As [`png`].
pub fn svg(data: &[u8], size: u32) -> Result<String, QrImageError> {
    let code = qr_code(data, size)?;
    let module_px = u32::try_from(module_px(code.width(), size))
        .map_err(|e| QrImageError::Internal(e.to_string()))?;
    Ok(code
        .render::<svg::Color<'_>>()
        .quiet_zone(true)
        .module_dimensions(module_px, module_px)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build())
}

/// Checks the size and builds the code in one byte-mode segment, smallest version first.
fn qr_code(data: &[u8], size: u32) -> Result<QrCode, QrImageError> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(QrImageError::InvalidSize { size });
    }
    if data.len() > MAX_DATA_LEN {
        return Err(QrImageError::TooLarge);
    }
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        match bits
            .push_byte_data(data)
            .and_then(|()| bits.push_terminator(EC_LEVEL))
        {
            Ok(()) => {
                return QrCode::with_bits(bits, EC_LEVEL)
                    .map_err(|e| QrImageError::Internal(e.to_string()));
            }
            Err(QrError::DataTooLong) => {}
            Err(e) => return Err(QrImageError::Internal(e.to_string())),
        }
    }
    Err(QrImageError::TooLarge)
}

fn module_px(modules: usize, size: u32) -> usize {
    // `size` ≤ MAX_SIZE, so it fits any usize.
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    (size / (modules + 2 * QUIET_ZONE)).max(1)
}

fn encode_png(pixels: &[u8], side: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// A payload-sized run of every byte value, with zeros and high bytes that are not UTF-8.
    fn sample() -> Vec<u8> {
        (0..=255u8).cycle().take(120).collect()
    }

    struct Gray {
        side: usize,
        pixels: Vec<u8>,
    }

    impl Gray {
        fn at(&self, x: usize, y: usize) -> u8 {
            self.pixels[y * self.side + x]
        }

        /// The pixel at the centre of module (`mx`, `my`), counted from the image's corner
        /// (so the quiet zone is modules 0..4).
        fn module(&self, module_px: usize, mx: usize, my: usize) -> u8 {
            self.at(
                mx * module_px + module_px / 2,
                my * module_px + module_px / 2,
            )
        }
    }

    fn decode_png(bytes: &[u8]) -> Gray {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(info.width, info.height);
        let side = info.width as usize;
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        pixels.truncate(frame.buffer_size());
        assert_eq!(pixels.len(), side * side);
        Gray { side, pixels }
    }

    /// Modules across (without quiet zone) of the smallest byte-mode level-M code for `len` bytes.
    fn modules_for(data: &[u8]) -> usize {
        qr_code(data, 256).unwrap().width()
    }

    #[test]
    fn png_has_the_signature_size_and_only_black_and_white() {
        let data = sample();
        let bytes = png(&data, 256).unwrap();
        assert_eq!(bytes.get(..8), Some(&PNG_SIGNATURE[..]));
        let image = decode_png(&bytes);
        let modules = modules_for(&data);
        let module_px = (256 / (modules + 8)).max(1);
        assert_eq!(image.side, (modules + 8) * module_px);
        assert!(image.side <= 256);
        assert!(image.pixels.iter().all(|&p| p == DARK || p == LIGHT));
        assert!(image.pixels.contains(&DARK) && image.pixels.contains(&LIGHT));
    }

    #[test]
    fn finder_patterns_and_quiet_zone_are_where_the_standard_puts_them() {
        let data = sample();
        let image = decode_png(&png(&data, 512).unwrap());
        let modules = modules_for(&data);
        let m = image.side / (modules + 8);
        assert_eq!(m, 512 / (modules + 8));
        let far = QUIET_ZONE + modules - 7; // first module of the right or bottom finders
        for (x0, y0) in [
            (QUIET_ZONE, QUIET_ZONE),
            (far, QUIET_ZONE),
            (QUIET_ZONE, far),
        ] {
            for dy in 0..7 {
                for dx in 0..7 {
                    let ring = dx.min(dy).min(6 - dx).min(6 - dy);
                    // Outer ring dark, next ring light, 3×3 centre dark.
                    let want = if ring == 1 { LIGHT } else { DARK };
                    assert_eq!(
                        image.module(m, x0 + dx, y0 + dy),
                        want,
                        "finder at ({x0},{y0}), module ({dx},{dy})"
                    );
                }
            }
        }
        // The separator just inside the top-left finder and the quiet zone are light.
        for i in 0..8 {
            assert_eq!(image.module(m, QUIET_ZONE + 7, QUIET_ZONE + i), LIGHT);
            assert_eq!(image.module(m, QUIET_ZONE + i, QUIET_ZONE + 7), LIGHT);
        }
        for y in 0..image.side {
            for x in 0..QUIET_ZONE * m {
                assert_eq!(image.at(x, y), LIGHT, "left quiet zone ({x},{y})");
                assert_eq!(image.at(image.side - 1 - x, y), LIGHT, "right quiet zone");
                assert_eq!(image.at(y, x), LIGHT, "top quiet zone");
                assert_eq!(image.at(y, image.side - 1 - x), LIGHT, "bottom quiet zone");
            }
        }
    }

    #[test]
    fn data_is_in_byte_mode_not_the_densest_mode() {
        // 20 digits fit version 1 (21 modules) in numeric mode but need version 2
        // (25 modules) in byte mode at level M.
        assert_eq!(modules_for(b"12345678901234567890"), 25);
        // Version 1 at level M holds 14 bytes.
        assert_eq!(modules_for(&[0xab; 14]), 21);
        assert_eq!(modules_for(&[0xab; 15]), 25);
    }

    #[test]
    fn module_size_follows_the_size_and_never_drops_below_one_pixel() {
        let data = sample();
        let modules = modules_for(&data);
        for size in [MIN_SIZE, 100, 256, 300, 1000, MAX_SIZE] {
            let image = decode_png(&png(&data, size).unwrap());
            let want = (size as usize / (modules + 8)).max(1) * (modules + 8);
            assert_eq!(image.side, want, "size {size}");
        }
        // Version 40 (177 modules + quiet zone) cannot fit 64 pixels: one pixel per module.
        let image = decode_png(&png(&[0; MAX_DATA_LEN], MIN_SIZE).unwrap());
        assert_eq!(image.side, 185);
    }

    #[test]
    fn svg_is_a_document_with_the_same_geometry() {
        let data = sample();
        let modules = modules_for(&data);
        let side = (256 / (modules + 8)) * (modules + 8);
        let doc = svg(&data, 256).unwrap();
        assert!(doc.starts_with("<?xml") || doc.starts_with("<svg"));
        assert!(doc.contains("<path") && doc.contains("<rect"));
        assert!(
            doc.contains(&format!(r#"width="{side}" height="{side}""#)),
            "{doc}"
        );
        assert!(doc.contains(r##"fill="#000000""##) && doc.contains(r##"fill="#ffffff""##));
        assert!(doc.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn too_much_data_is_refused() {
        assert!(png(&[0; MAX_DATA_LEN], 256).is_ok());
        assert!(svg(&[0; MAX_DATA_LEN], 256).is_ok());
        for len in [MAX_DATA_LEN + 1, 2954, 10_000] {
            assert_eq!(
                png(&vec![0; len], 256),
                Err(QrImageError::TooLarge),
                "{len}"
            );
            assert_eq!(
                svg(&vec![0; len], 256),
                Err(QrImageError::TooLarge),
                "{len}"
            );
        }
        // The constant is qrcode's own limit, not a guess: one more byte does not fit version 40.
        let mut bits = Bits::new(Version::Normal(40));
        let too_long = bits
            .push_byte_data(&[0; MAX_DATA_LEN + 1])
            .and_then(|()| bits.push_terminator(EC_LEVEL));
        assert_eq!(too_long, Err(QrError::DataTooLong));
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        for size in [0, 1, MIN_SIZE - 1, MAX_SIZE + 1, u32::MAX] {
            assert_eq!(png(b"x", size), Err(QrImageError::InvalidSize { size }));
            assert_eq!(svg(b"x", size), Err(QrImageError::InvalidSize { size }));
        }
        // Size is checked first: an oversized request with a bad size reports the size.
        assert_eq!(
            png(&[0; 3000], 10),
            Err(QrImageError::InvalidSize { size: 10 })
        );
    }

    #[test]
    fn empty_data_still_renders() {
        assert_eq!(modules_for(&[]), 21);
        assert!(png(&[], 64).is_ok());
    }

    /// Reads the image back with an independent QR decoder.
    fn read_back(image: &Gray) -> (rqrr::MetaData, Vec<u8>) {
        let mut prepared =
            rqrr::PreparedImage::prepare_from_greyscale(image.side, image.side, |x, y| {
                image.at(x, y)
            });
        let grids = prepared.detect_grids();
        assert_eq!(grids.len(), 1);
        let mut out = Vec::new();
        let meta = grids[0].decode_to(&mut out).unwrap();
        (meta, out)
    }

    #[test]
    fn png_reads_back_to_the_same_bytes() {
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (sample(), 256),
            (sample(), MIN_SIZE),
            (b"12345678901234567890".to_vec(), 128),
            ((0..=255u8).rev().cycle().take(600).collect(), 1024),
            (Vec::new(), 64),
        ];
        for (data, size) in cases {
            let image = decode_png(&png(&data, size).unwrap());
            let (meta, read) = read_back(&image);
            assert_eq!(read, data, "{} bytes at {size}px", data.len());
            // rqrr reports the format bits' level: 0b00 is M.
            assert_eq!(meta.ecc_level, 0);
            assert_eq!(meta.version.to_size(), modules_for(&data));
        }
    }
}
