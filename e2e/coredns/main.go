// Command coredns-tramontane is a minimal CoreDNS for the local node: cluster DNS from the
// kubernetes plugin and nothing else (no forward: the cluster must not resolve outside names).
// It is upstream's coredns.go with only these plugins imported, which keeps the build to about a
// minute instead of pulling in every cloud provider's SDK.
package main

import (
	"log"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives are the imported plugins in plugin.cfg's order, which is their execution order: the
// generated default list names every upstream plugin, and a Corefile could then name one that
// was never registered.
var directives = []string{"bind", "ready", "health", "errors", "cache", "kubernetes"}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		log.Fatalf("coredns: %v", err)
	}
	coremain.Run()
}
