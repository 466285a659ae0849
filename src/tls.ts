// HTTPS served by the relay itself (`server.tls`), for admins without a reverse proxy (the
// pairing page needs a secure context). The certificate and key are files, read at start and
// again on every reload (SIGHUP): a certbot renewal replaces them and sends SIGHUP from its
// deploy hook, and new connections get the new certificate (server.setSecureContext) while
// open ones keep theirs. A pair that does not load is refused and the old one stays.
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';

export type TlsFiles = { cert: string; key: string };
export type TlsPair = { cert: Buffer; key: Buffer; /** SHA-256 of the leaf certificate, as openssl prints it. */ fingerprint: string; names: string[]; notAfter: string };

/** Reads and checks a certificate and key; throws with a message naming the file and the problem. */
export function loadTls(files: TlsFiles): TlsPair {
  const read = (what: 'cert' | 'key') => {
    try {
      return readFileSync(files[what]);
    } catch (err) {
      throw new Error(`server.tls.${what}: cannot read ${files[what]}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  };
  const cert = read('cert');
  const key = read('key');
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch (err) {
    throw new Error(`server.tls.cert: ${files.cert} is not a PEM certificate: ${(err as Error).message}`);
  }
  try {
    // Fails when the key is not PEM or does not belong to the certificate.
    createSecureContext({ cert, key });
  } catch (err) {
    throw new Error(`server.tls.key: ${files.key} does not load with ${files.cert}: ${(err as Error).message}`);
  }
  const names = (leaf.subjectAltName ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.startsWith('DNS:') || s.startsWith('IP Address:'))
    .map((s) => s.replace(/^DNS:|^IP Address:/, ''));
  return { cert, key, fingerprint: leaf.fingerprint256, names, notAfter: leaf.validTo };
}
