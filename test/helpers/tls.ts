// Test certificates, made at run time with openssl (node:crypto cannot sign X.509): a
// self-signed certificate that is its own trust anchor, for the providers' real host names,
// so a sink verifies the fake exactly as it would verify Google or Apple. Nothing is committed.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './tmp.js';

export type TestCertificate = { cert: string; key: string; certFile: string; keyFile: string };

/** A P-256 certificate for `names` (DNS names or IPs), valid for two days. */
export function testCertificate(names: string[], cn = names[0] ?? 'localhost'): TestCertificate {
  const dir = tempDir('push-relay-tls-');
  const keyFile = join(dir, 'key.pem');
  const certFile = join(dir, 'cert.pem');
  const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  execFileSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', certFile,
      '-days', '2', '-subj', `/CN=${cn}`, '-addext', `subjectAltName=${san}`],
    { stdio: 'pipe', timeout: 10_000 },
  );
  return { cert: readFileSync(certFile, 'utf8'), key: readFileSync(keyFile, 'utf8'), certFile, keyFile };
}
