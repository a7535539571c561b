function ckpt_write_text_atomic(path, text)
%CKPT_WRITE_TEXT_ATOMIC  Write a small text file so that it is either old or complete.
%   ckpt_write_text_atomic('checkpoints/last.txt', sprintf('step_00000400.mat\n'))
%   The text goes to '.tmp-<name>' in the same folder, which is then renamed over path.
%   Used for completion markers and the last.txt pointer.
  [folder, name, extension] = fileparts(path);
  temp = fullfile(folder, ['.tmp-' name extension]);
  try
    fid = fopen(temp, 'w');
    if fid < 0
      error('ckpt:writeFailed', 'cannot open %s for writing', temp);
    end
    count = fwrite(fid, text, 'char');
    if fclose(fid) ~= 0 || count ~= numel(text)
      error('ckpt:writeFailed', 'cannot write %s (disk full?)', temp);
    end
    ckpt_rename(temp, path);
  catch failure
    if isfile(temp)
      delete(temp);    % a failed write must not leave its debris behind
    end
    rethrow(failure);
  end
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! target = fullfile (folder, 'last.txt');
%! ckpt_write_text_atomic (target, 'first');
%! ckpt_write_text_atomic (target, 'second');
%! assert (fileread (target), 'second');
%! listing = dir (folder);
%! assert (sort ({listing.name}), {'.', '..', 'last.txt'});
%! rmdir (folder, 's');
