package main

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"image"
	"math/bits"
	"sync"

	"github.com/jezek/xgb/xfixes"
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

// drawCursor blends the pointer's image (premultiplied ARGB) over img at its position.
func drawCursor(img *image.RGBA, c *xfixes.GetCursorImageReply) {
	if c == nil || len(c.CursorImage) < int(c.Width)*int(c.Height) {
		return
	}
	ox, oy := int(c.X)-int(c.Xhot), int(c.Y)-int(c.Yhot)
	w, h := img.Rect.Dx(), img.Rect.Dy()
	for cy := 0; cy < int(c.Height); cy++ {
		y := oy + cy
		if y < 0 || y >= h {
			continue
		}
		for cx := 0; cx < int(c.Width); cx++ {
			x := ox + cx
			if x < 0 || x >= w {
				continue
			}
			p := c.CursorImage[cy*int(c.Width)+cx]
			a := p >> 24
			if a == 0 {
				continue
			}
			d := img.Pix[y*img.Stride+4*x:]
			inv := 255 - a
			d[0] = byte(min(255, (p>>16)&0xff+(uint32(d[0])*inv+127)/255))
			d[1] = byte(min(255, (p>>8)&0xff+(uint32(d[1])*inv+127)/255))
			d[2] = byte(min(255, p&0xff+(uint32(d[2])*inv+127)/255))
		}
	}
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

// encodePNG writes img (opaque) as an 8-bit RGB PNG, every row with the Sub filter, zlib level 1.
// image/png does the same work about twice as slowly: it tries all five filters on every row to
// pick one, which buys a few percent of size on a screen. For a 1280×800 browser page: 9-10 ms
// and ~240 KB here against 19 ms and ~230 KB (host CPU; gVisor adds about 3×).
func encodePNG(img *image.RGBA) ([]byte, error) {
	w, h := img.Rect.Dx(), img.Rect.Dy()
	st := pngState.Get().(*pngWriterState)
	defer pngState.Put(st)
	var out bytes.Buffer
	out.Grow(w * h / 2)
	out.WriteString("\x89PNG\r\n\x1a\n")
	var ihdr [13]byte
	binary.BigEndian.PutUint32(ihdr[0:], uint32(w))
	binary.BigEndian.PutUint32(ihdr[4:], uint32(h))
	ihdr[8], ihdr[9] = 8, 2 // 8 bits per sample, truecolor (RGB); compression, filter, interlace 0
	writeChunk(&out, "IHDR", ihdr[:])

	cw := &chunkWriter{out: &out, buf: st.chunk[:0]}
	if st.zw == nil {
		var err error
		if st.zw, err = zlib.NewWriterLevel(cw, zlib.BestSpeed); err != nil {
			return nil, err
		}
	} else {
		st.zw.Reset(cw)
	}
	n := 1 + 3*w
	if cap(st.row) < n {
		st.row = make([]byte, n)
	}
	row := st.row[:n]
	row[0] = 1 // Sub: each byte minus the same channel of the pixel to its left
	for y := 0; y < h; y++ {
		p := img.Pix[y*img.Stride:]
		var pr, pg, pb byte
		for x, o := 0, 1; x < w; x, o = x+1, o+3 {
			r, g, b := p[4*x], p[4*x+1], p[4*x+2]
			row[o], row[o+1], row[o+2] = r-pr, g-pg, b-pb
			pr, pg, pb = r, g, b
		}
		if _, err := st.zw.Write(row); err != nil {
			return nil, err
		}
	}
	if err := st.zw.Close(); err != nil {
		return nil, err
	}
	cw.flush()
	st.chunk = cw.buf[:0]
	writeChunk(&out, "IEND", nil)
	return out.Bytes(), nil
}

type pngWriterState struct {
	zw    *zlib.Writer
	row   []byte
	chunk []byte
}

var pngState = sync.Pool{New: func() any { return &pngWriterState{chunk: make([]byte, 0, idatSize)} }}

const idatSize = 256 << 10

// chunkWriter cuts the zlib stream into IDAT chunks.
type chunkWriter struct {
	out *bytes.Buffer
	buf []byte
}

func (c *chunkWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), idatSize-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == idatSize {
			c.flush()
		}
	}
	return n, nil
}

func (c *chunkWriter) flush() {
	if len(c.buf) > 0 {
		writeChunk(c.out, "IDAT", c.buf)
		c.buf = c.buf[:0]
	}
}

func writeChunk(out *bytes.Buffer, typ string, data []byte) {
	var hdr [8]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(data)))
	copy(hdr[4:], typ)
	out.Write(hdr[:])
	out.Write(data)
	crc := crc32.NewIEEE()
	crc.Write(hdr[4:])
	crc.Write(data)
	var sum [4]byte
	binary.BigEndian.PutUint32(sum[:], crc.Sum32())
	out.Write(sum[:])
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
	drawCursor(img, raw.cursor)
	if width > 0 {
		img = scaleDown(img, width)
	}
	return encodePNG(img)
}
