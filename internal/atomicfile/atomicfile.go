// Package atomicfile writes files the way the relay's state directory
// needs: whole or not at all, and never through a planted link.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write writes b to path, mode 0600, through a new file of its own
// (O_CREATE|O_EXCL, in the same directory) synced and renamed over path:
// a crash leaves the old file or the new one, and a symbolic link planted
// at path is replaced, never followed, so nothing is written elsewhere.
func Write(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // a no-op once renamed
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
