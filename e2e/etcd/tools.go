//go:build tools

// Package tools pins the etcd server command that e2e/build.sh builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
