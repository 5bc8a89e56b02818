module libublk/ublk

go 1.21
