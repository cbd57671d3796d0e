// Command vcsim-launcher starts govmomi's vCenter simulator (Debian's
// golang-github-vmware-govmomi-dev 0.24, which ships the library but not the vcsim command) on
// 127.0.0.1 for Sendense's tests, with one VM whose disks behave like real vSphere ones:
// snapshots freeze the disk files, removal consolidates, and changed block tracking answers
// QueryChangedDiskAreas (see vm.go).
//
// Build in GOPATH mode: GO111MODULE=off GOPATH=/usr/share/gocode go build -o OUT ./tests/vcsim
//
// It writes a JSON ready file once it serves (see readyFile), and exits when its stdin closes or
// on SIGTERM/SIGINT, so that a test that dies leaves nothing running.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/simulator"
)

type readyDisk struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	UnitNumber    int32  `json:"unit_number"`
	CapacityBytes int64  `json:"capacity_bytes"`
	FileName      string `json:"file_name"`
	PathOnDisk    string `json:"path_on_disk"`
}

type readyVM struct {
	Name  string      `json:"name"`
	Moref string      `json:"moref"`
	Uuid  string      `json:"uuid"`
	Disks []readyDisk `json:"disks"`
}

// readyFile is what the launcher writes (atomically) once the simulator and the control
// endpoint accept connections.
type readyFile struct {
	URL          string  `json:"url"`
	SdkURL       string  `json:"sdk_url"`
	User         string  `json:"user"`
	CertPem      string  `json:"cert_pem"`
	CertSha256   string  `json:"cert_sha256"`
	Datacenter   string  `json:"datacenter"`
	Datastore    string  `json:"datastore"`
	DatastoreDir string  `json:"datastore_dir"`
	VM           readyVM `json:"vm"`
	ControlURL   string  `json:"control_url"`
	Pid          int     `json:"pid"`
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the SOAP/HTTPS server (loopback only)")
	dir := flag.String("dir", "", "directory of the local datastore (created if missing)")
	ready := flag.String("ready", "", "file to write (JSON) once serving")
	user := flag.String("user", "administrator@vsphere.local", "the only user that may log in")
	passwordFile := flag.String("password-file", "", "file holding the only accepted password")
	disks := flag.String("disks", "64M,32M", "sizes of the test VM's disks (K, M or G suffix)")
	vmName := flag.String("vm", "vm1", "name of the test VM")
	flag.Parse()

	if err := run(*listen, *dir, *ready, *user, *passwordFile, *disks, *vmName); err != nil {
		log.Fatalf("vcsim-launcher: %v", err)
	}
}

func run(listen, dir, ready, user, passwordFile, disks, vmName string) error {
	if dir == "" || ready == "" || passwordFile == "" {
		return errors.New("-dir, -ready and -password-file are required")
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %v", listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-listen %q: only a loopback address is allowed", listen)
	}
	sizes, err := parseSizes(disks)
	if err != nil {
		return fmt.Errorf("-disks %q: %v", disks, err)
	}
	if vmName == "" || strings.ContainsAny(vmName, "/[]") {
		return fmt.Errorf("-vm %q: not a usable VM name", vmName)
	}
	pw, err := ioutil.ReadFile(passwordFile)
	if err != nil {
		return fmt.Errorf("-password-file: %v", err)
	}
	password := strings.TrimRight(string(pw), "\r\n")
	if password == "" {
		return fmt.Errorf("-password-file %s is empty", passwordFile)
	}
	dsDir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dsDir, 0o700); err != nil {
		return fmt.Errorf("-dir: %v", err)
	}

	// Only the user given may log in: 0.24 compares Login against Service.Listen.User unless it
	// is the default (which accepts any non-empty pair).
	model := simulator.VPX()
	model.Datastore = 0 // ours lives in -dir, created below
	model.Machine = 0   // only the test VM
	model.Cluster = 0
	model.ClusterHost = 0
	model.Host = 1
	if err := model.Create(); err != nil {
		return fmt.Errorf("simulator model: %v", err)
	}
	defer model.Remove()
	// The simulator's default certificate (Go's httptest one) has a 1024-bit RSA key, which
	// OpenSSL at Debian's security level (curl, nbdkit) and webpki (rustls) refuse: use a fresh
	// self-signed ECDSA P-256 one for 127.0.0.1.
	cert, err := selfSignedCert()
	if err != nil {
		return fmt.Errorf("certificate: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: listen, User: url.UserPassword(user, password)}
	server := model.Service.NewServer()
	defer server.Close()

	// The plain simulator serves /folder without any session; real vSphere wants the SOAP session
	// cookie (or basic auth), so check it, which makes the nbdkit path honest.
	server.Config.Handler = requireSession(server.Config.Handler)

	certDER := server.Certificate().Raw
	sum := sha256.Sum256(certDER)
	certPath := strings.TrimSuffix(ready, filepath.Ext(ready)) + ".cert.pem"
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})
	if err := ioutil.WriteFile(certPath, certPEM, 0o644); err != nil {
		return fmt.Errorf("write %s: %v", certPath, err)
	}

	base := &url.URL{Scheme: "https", Host: server.URL.Host}
	sdk := &url.URL{Scheme: "https", Host: server.URL.Host, Path: server.URL.Path}
	login := *server.URL
	login.User = url.UserPassword(user, password)
	ctx := context.Background()
	client, err := govmomi.NewClient(ctx, &login, true)
	if err != nil {
		return fmt.Errorf("own login: %v", err)
	}

	inv, err := setupInventory(ctx, client, dsDir, vmName, sizes)
	if err != nil {
		return err
	}

	control, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return fmt.Errorf("control listener: %v", err)
	}
	ctl := &controller{client: client, dsDir: dsDir, datacenter: inv.datacenter}
	go func() { _ = http.Serve(control, ctl) }()

	r := readyFile{
		URL:          base.String(),
		SdkURL:       sdk.String(),
		User:         user,
		CertPem:      certPath,
		CertSha256:   hex.EncodeToString(sum[:]),
		Datacenter:   inv.datacenter,
		Datastore:    inv.datastore,
		DatastoreDir: dsDir,
		VM:           inv.vm,
		ControlURL:   "http://" + control.Addr().String(),
		Pid:          os.Getpid(),
	}
	if err := writeAtomically(ready, r); err != nil {
		return err
	}
	log.Printf("vcsim-launcher: serving %s (control %s), VM %s", r.URL, r.ControlURL, vmName)

	done := make(chan string, 2)
	go func() {
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		done <- "stdin closed"
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { done <- (<-sig).String() }()
	why := <-done
	log.Printf("vcsim-launcher: exiting (%s)", why)
	_ = control.Close()
	return nil
}

func selfSignedCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"Sendense vcsim"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func writeAtomically(path string, v interface{}) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := ioutil.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %v", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %v", tmp, err)
	}
	return nil
}

// parseSizes reads "64M,32M" into bytes; each must be a positive multiple of 64 KiB (the
// changed-block granularity of this simulator).
func parseSizes(s string) ([]int64, error) {
	var out []int64
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, errors.New("empty size")
		}
		mult := int64(1)
		switch strings.ToUpper(part[len(part)-1:]) {
		case "K":
			mult = 1 << 10
		case "M":
			mult = 1 << 20
		case "G":
			mult = 1 << 30
		}
		num := part
		if mult != 1 {
			num = part[:len(part)-1]
		}
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a size", part)
		}
		size := n * mult
		if size%blockSize != 0 {
			return nil, fmt.Errorf("%q is not a multiple of 64K", part)
		}
		out = append(out, size)
	}
	if len(out) > 15 {
		return nil, errors.New("at most 15 disks (one SCSI controller)")
	}
	return out, nil
}

// requireSession answers 401 on /folder/ unless the request carries a live SOAP session cookie,
// checked by asking the simulator itself (its session table is private).
func requireSession(next http.Handler) http.Handler {
	const probe = `<?xml version="1.0" encoding="UTF-8"?>` +
		`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">` +
		`<soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this>` +
		`</CurrentTime></soapenv:Body></soapenv:Envelope>`
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/folder/") {
			next.ServeHTTP(w, r)
			return
		}
		cookie, err := r.Cookie("vmware_soap_session")
		ok := false
		if err == nil {
			req, _ := http.NewRequest(http.MethodPost, "/sdk", strings.NewReader(probe))
			req.RemoteAddr = r.RemoteAddr
			req.AddCookie(cookie)
			rec := &statusRecorder{header: http.Header{}}
			next.ServeHTTP(rec, req)
			ok = rec.status == http.StatusOK
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
			http.Error(w, "no valid vmware_soap_session cookie", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

type statusRecorder struct {
	header http.Header
	status int
}

func (s *statusRecorder) Header() http.Header { return s.header }
func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return len(b), nil
}
func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
}
