//! `gencert DIR NAME...`: a self-signed ECDSA P-256 certificate for the names, valid for
//! a year, written as DIR/cert.pem and DIR/key.pem (PKCS#8), for benchmarks that run
//! mxgate with STARTTLS. The certificate is its own root: clients trust cert.pem.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, names)) = args.split_first().filter(|(_, names)| !names.is_empty()) else {
        eprintln!("usage: gencert DIR NAME...");
        std::process::exit(2);
    };
    let dir = std::path::Path::new(dir);
    let written = loadtest::tls::self_signed(names).and_then(|(cert, key, _)| {
        std::fs::write(dir.join("cert.pem"), cert)
            .and_then(|()| std::fs::write(dir.join("key.pem"), key))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        eprintln!("gencert: {e}");
        std::process::exit(1);
    }
}
