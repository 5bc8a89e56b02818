//go:build !ublk_pkgconfig

package ublk

// Default: the library built in this repository (make build), found at run
// time through an rpath. Build with `-tags ublk_pkgconfig` to use an installed
// libublk instead (make install PREFIX=…; PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig).

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -lublk -Wl,-rpath,${SRCDIR}/../../target/release
*/
import "C"
