//go:build ublk_pkgconfig

package ublk

// An installed libublk, found with `pkg-config ublk` (make install writes ublk.pc).

/*
#cgo pkg-config: ublk
*/
import "C"
