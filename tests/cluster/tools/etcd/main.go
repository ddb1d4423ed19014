// Command etcd is upstream etcd's server entry point (etcdmain.Main), built as
// a standalone binary for the local test cluster.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
