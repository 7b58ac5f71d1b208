package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// VMDK files as qemu-img makes them: a monolithicFlat pair (text descriptor + raw extent) or
// a hosted sparse file (magic KDMV) with its descriptor embedded. Snapshot deltas are sparse
// files whose descriptor names the parent (parentFileNameHint) and its CID (parentCID);
// qemu refuses to read through a delta whose parentCID does not match the parent's CID.

const sparseMagic = "KDMV"

type sparseHeader struct {
	Magic            [4]byte
	Version          uint32
	Flags            uint32
	Capacity         uint64
	GrainSize        uint64
	DescriptorOffset uint64
	DescriptorSize   uint64
}

func isSparse(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	magic := make([]byte, 4)
	if _, err := io.ReadFull(f, magic); err != nil {
		return false, nil
	}
	return string(magic) == sparseMagic, nil
}

// readDescriptor returns the descriptor text of a VMDK, embedded or not.
func readDescriptor(path string) (string, error) {
	sparse, err := isSparse(path)
	if err != nil {
		return "", err
	}
	if !sparse {
		data, err := ioutil.ReadFile(path)
		if err != nil {
			return "", err
		}
		return string(data), nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var h sparseHeader
	if err := binary.Read(f, binary.LittleEndian, &h); err != nil {
		return "", fmt.Errorf("%s: %v", path, err)
	}
	buf := make([]byte, h.DescriptorSize*512)
	if _, err := f.ReadAt(buf, int64(h.DescriptorOffset*512)); err != nil {
		return "", fmt.Errorf("%s: descriptor: %v", path, err)
	}
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	return string(buf), nil
}

var flatExtentPattern = regexp.MustCompile(`(?m)^RW\s+\d+\s+FLAT\s+"([^"]+)"\s+0\s*$`)

// flatExtent returns the raw extent file of a monolithicFlat descriptor, or "" when the
// VMDK is not a single flat extent.
func flatExtent(path string) (string, error) {
	text, err := readDescriptor(path)
	if err != nil {
		return "", err
	}
	m := flatExtentPattern.FindAllStringSubmatch(text, -1)
	if len(m) != 1 {
		return "", nil
	}
	return filepath.Join(filepath.Dir(path), m[0][1]), nil
}

func descriptorField(text, key string) string {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `\s*=\s*"?([^"\n]*)"?\s*$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		return ""
	}
	return m[1]
}

// setSparseParent points a sparse delta at a new parent: qemu cannot change a VMDK's
// backing file, so the embedded descriptor is rewritten in place.
func setSparseParent(path, parentHint, parentCID string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	var h sparseHeader
	if err := binary.Read(f, binary.LittleEndian, &h); err != nil {
		return err
	}
	if string(h.Magic[:]) != sparseMagic {
		return fmt.Errorf("%s is not a sparse VMDK", path)
	}
	size := int(h.DescriptorSize * 512)
	buf := make([]byte, size)
	if _, err := f.ReadAt(buf, int64(h.DescriptorOffset*512)); err != nil {
		return err
	}
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	text := string(buf)
	text = regexp.MustCompile(`(?m)^parentCID=.*$`).ReplaceAllString(text, "parentCID="+parentCID)
	text = regexp.MustCompile(`(?m)^parentFileNameHint=.*$`).ReplaceAllString(text,
		fmt.Sprintf("parentFileNameHint=%q", parentHint))
	if len(text) > size {
		return fmt.Errorf("%s: new descriptor does not fit", path)
	}
	out := make([]byte, size)
	copy(out, text)
	_, err = f.WriteAt(out, int64(h.DescriptorOffset*512))
	return err
}

// runQemu runs a qemu tool and returns its output; errors carry its stderr.
func runQemu(dir string, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err,
			strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
