function digest = ckpt_sha256_file(path, method)
%CKPT_SHA256_FILE  The sha256 of a file's bytes, as 64 lowercase hex characters.
%   digest = ckpt_sha256_file('checkpoints/step_00000400.mat')
%   method: 'auto' (default), 'octave' or 'java'.
%     'octave': Octave's built-in hash('sha256', ...); reads the whole file into memory.
%     'java':   java.security.MessageDigest, read in 8 MB chunks. MATLAB has no sha256
%               function but always has its Java VM (except with -nojvm), so 'auto' uses
%               this in MATLAB. Octave runs it too when a Java VM is found (set JAVA_HOME).
%   Both give the digest that `sha256sum` prints; the tests check both under Octave.
  if nargin < 2 || strcmp(method, 'auto')
    if exist('OCTAVE_VERSION', 'builtin')
      method = 'octave';
    else
      method = 'java';
    end
  end
  fid = fopen(path, 'r');
  if fid < 0
    error('ckpt:readFailed', 'cannot open %s', path);
  end
  closer = onCleanup(@() fclose(fid));
  switch method
    case 'octave'
      digest = hash('sha256', fread(fid, Inf, 'uint8=>char')');
    case 'java'
      digest = java_sha256(fid);
    otherwise
      error('ckpt:badMethod', 'ckpt_sha256_file: unknown method ''%s''', method);
  end
end

function digest = java_sha256(fid)
  chunk_bytes = 8 * 1024 * 1024;
  hasher = javaMethod('getInstance', 'java.security.MessageDigest', 'SHA-256');
  while true
    chunk = fread(fid, chunk_bytes, '*uint8');
    if isempty(chunk)
      break;
    end
    hasher.update(typecast(chunk, 'int8'));   % Java's byte is signed
  end
  bytes = typecast(int8(hasher.digest()), 'uint8');
  digest = lower(reshape(dec2hex(bytes, 2).', 1, []));
end

%!test
%! path = [tempname() '.bin'];
%! fid = fopen (path, 'w'); fwrite (fid, uint8 (0:255)); fwrite (fid, 'abc'); fclose (fid);
%! [status, expected] = system (['sha256sum ' path]);
%! assert (ckpt_sha256_file (path, 'octave'), expected(1:64));
%! assert (ckpt_sha256_file (path), expected(1:64));
%! delete (path);

%!testif ; usejava ("jvm")
%! path = [tempname() '.bin'];
%! fid = fopen (path, 'w'); fwrite (fid, uint8 (mod ((1:100000) * 7, 256))); fclose (fid);
%! assert (ckpt_sha256_file (path, 'java'), ckpt_sha256_file (path, 'octave'));
%! empty = [tempname() '.bin']; fclose (fopen (empty, 'w'));
%! assert (ckpt_sha256_file (empty, 'java'), ...
%!         'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
%! delete (path); delete (empty);

%!error <cannot open> ckpt_sha256_file (tempname ())
