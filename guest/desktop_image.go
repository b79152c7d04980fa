package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"image"
	"image/png"
	"math/bits"
	"sync"
)

// toRGBA turns the server's pixels into an opaque RGBA image, in place when they are 32 bits per
// pixel (the usual depth 24 and 32 TrueColor: the common little-endian xRGB layout takes one
// 32-bit shuffle per pixel, no interface call).
func toRGBA(raw *rawImage) (*image.RGBA, error) {
	w, h := raw.width, raw.height
	rect := image.Rect(0, 0, w, h)
	switch raw.bpp {
	case 32:
		stride := w * 4
		if len(raw.data) < stride*h {
			return nil, fmt.Errorf("short image: %d bytes for %d×%d", len(raw.data), w, h)
		}
		p := raw.data[:stride*h]
		if !raw.msbFirst && raw.rmask == 0xff0000 && raw.gmask == 0xff00 && raw.bmask == 0xff {
			// Bytes B G R x → R G B 0xff.
			for i := 0; i+4 <= len(p); i += 4 {
				v := binary.LittleEndian.Uint32(p[i:])
				v = (v>>16)&0xff | v&0xff00 | (v&0xff)<<16 | 0xff000000
				binary.LittleEndian.PutUint32(p[i:], v)
			}
			return &image.RGBA{Pix: p, Stride: stride, Rect: rect}, nil
		}
		m := newMasks(raw)
		for i := 0; i+4 <= len(p); i += 4 {
			var v uint32
			if raw.msbFirst {
				v = binary.BigEndian.Uint32(p[i:])
			} else {
				v = binary.LittleEndian.Uint32(p[i:])
			}
			p[i], p[i+1], p[i+2], p[i+3] = m.r.get(v), m.g.get(v), m.b.get(v), 0xff
		}
		return &image.RGBA{Pix: p, Stride: stride, Rect: rect}, nil
	case 16, 24:
		bpp := raw.bpp / 8
		stride := (w*raw.bpp + 31) / 32 * 4 // scanlines padded to 32 bits
		if len(raw.data) < stride*h {
			return nil, fmt.Errorf("short image: %d bytes for %d×%d", len(raw.data), w, h)
		}
		m := newMasks(raw)
		img := image.NewRGBA(rect)
		for y := 0; y < h; y++ {
			row := raw.data[y*stride:]
			out := img.Pix[y*img.Stride:]
			for x := 0; x < w; x++ {
				var v uint32
				for k := 0; k < bpp; k++ {
					b := uint32(row[x*bpp+k])
					if raw.msbFirst {
						v = v<<8 | b
					} else {
						v |= b << (8 * k)
					}
				}
				out[4*x], out[4*x+1], out[4*x+2], out[4*x+3] = m.r.get(v), m.g.get(v), m.b.get(v), 0xff
			}
		}
		return img, nil
	}
	return nil, fmt.Errorf("unsupported X pixel format: depth %d, %d bits per pixel", raw.depth, raw.bpp)
}

type channel struct {
	mask  uint32
	shift int
	max   uint32
}

func (c channel) get(v uint32) byte {
	if c.max == 0 {
		return 0
	}
	return byte(((v & c.mask) >> c.shift) * 255 / c.max)
}

type masks struct{ r, g, b channel }

func newMasks(raw *rawImage) masks {
	ch := func(m uint32) channel {
		if m == 0 {
			return channel{}
		}
		s := bits.TrailingZeros32(m)
		return channel{mask: m, shift: s, max: m >> s}
	}
	return masks{ch(raw.rmask), ch(raw.gmask), ch(raw.bmask)}
}

// scaleDown resizes src to width w (≤ src's width), keeping the aspect ratio, by area averaging
// (each output pixel is the mean of the source pixels it covers; sharp text stays readable and
// nothing aliases). Alpha is 0xff throughout.
func scaleDown(src *image.RGBA, w int) *image.RGBA {
	sw, sh := src.Rect.Dx(), src.Rect.Dy()
	if w >= sw || w < 1 {
		return src
	}
	h := max(1, (sh*w+sw/2)/sw)
	xs := boxWeights(sw, w)
	ys := boxWeights(sh, h)

	// Horizontal pass into 16.16-weighted sums per row, then vertical.
	tmp := make([]uint32, sh*w*3)
	for y := 0; y < sh; y++ {
		row := src.Pix[y*src.Stride:]
		out := tmp[y*w*3:]
		for x, taps := range xs {
			var r, g, b uint32
			for _, t := range taps {
				p := row[4*t.i:]
				r += uint32(p[0]) * t.w
				g += uint32(p[1]) * t.w
				b += uint32(p[2]) * t.w
			}
			out[3*x], out[3*x+1], out[3*x+2] = r>>8, g>>8, b>>8 // 8.8 fixed point
		}
	}
	dst := image.NewRGBA(image.Rect(0, 0, w, h))
	for y, taps := range ys {
		out := dst.Pix[y*dst.Stride:]
		for x := 0; x < w; x++ {
			var r, g, b uint64
			for _, t := range taps {
				p := tmp[(t.i*w+x)*3:]
				r += uint64(p[0]) * uint64(t.w)
				g += uint64(p[1]) * uint64(t.w)
				b += uint64(p[2]) * uint64(t.w)
			}
			// sum = value·2^8·2^16; round.
			const half = 1 << 23
			out[4*x] = clamp8((r + half) >> 24)
			out[4*x+1] = clamp8((g + half) >> 24)
			out[4*x+2] = clamp8((b + half) >> 24)
			out[4*x+3] = 0xff
		}
	}
	return dst
}

func clamp8(v uint64) byte {
	if v > 255 {
		return 255
	}
	return byte(v)
}

type tap struct {
	i int
	w uint32 // weight, 16.16; the taps of one output pixel sum to 1<<16
}

// boxWeights maps each of n output pixels to the source pixels (of m) it covers and how much.
func boxWeights(m, n int) [][]tap {
	out := make([][]tap, n)
	for o := 0; o < n; o++ {
		// Output pixel o covers source [o·m/n, (o+1)·m/n), in units of 1/n source pixel.
		lo, hi := o*m, (o+1)*m
		var taps []tap
		var sum uint32
		for i := lo / n; i*n < hi && i < m; i++ {
			a, b := max(lo, i*n), min(hi, (i+1)*n)
			if b <= a {
				continue
			}
			wt := uint32(uint64(b-a) << 16 / uint64(m))
			taps = append(taps, tap{i: i, w: wt})
			sum += wt
		}
		if len(taps) > 0 { // rounding: the largest tap takes the remainder
			big := 0
			for k := range taps {
				if taps[k].w > taps[big].w {
					big = k
				}
			}
			taps[big].w += 1<<16 - sum
		}
		out[o] = taps
	}
	return out
}

// pngBuffers lets the encoder reuse its compressor state between screenshots.
type pngBuffers struct{ b *png.EncoderBuffer }

var pngPool = sync.Pool{New: func() any { return new(pngBuffers) }}

func (p *pngBuffers) Get() *png.EncoderBuffer  { return p.b }
func (p *pngBuffers) Put(b *png.EncoderBuffer) { p.b = b }

// encodePNG encodes fast (zlib level 1): screenshots are taken often and compress well anyway.
func encodePNG(img image.Image) ([]byte, error) {
	pb := pngPool.Get().(*pngBuffers)
	defer pngPool.Put(pb)
	enc := png.Encoder{CompressionLevel: png.BestSpeed, BufferPool: pb}
	var buf bytes.Buffer
	buf.Grow(256 << 10)
	if err := enc.Encode(&buf, img); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// screenshotPNG captures the screen (under d.mu) and encodes it (outside), scaled to width if
// width > 0. want: the connection an action list runs on, nil for a lone request.
func (d *desktop) screenshotPNG(want *xconn, width int) ([]byte, error) {
	var raw *rawImage
	f := func(x *xconn) error {
		if width > x.width {
			return errf(400, "invalid_width", "width", "width %d is wider than the %d×%d screen", width, x.width, x.height)
		}
		var err error
		raw, err = x.capture()
		return err
	}
	var err error
	if want == nil {
		err = d.readOnly(f)
	} else {
		err = d.withX(want, f)
	}
	if err != nil {
		return nil, err
	}
	img, err := toRGBA(raw)
	if err != nil {
		return nil, err
	}
	if width > 0 {
		img = scaleDown(img, width)
	}
	return encodePNG(img)
}
